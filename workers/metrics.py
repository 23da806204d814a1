"""Prometheus metrics for a worker, on a registry of its own (never the global default one).

One `WorkerMetrics` per process (or per test): every series carries `role` and `worker_id`, so
a scrape of several workers can be told apart. The engine side is published as gauges from the
engine loop's load snapshots; latencies and byte counts are observed where they happen.

    metrics = WorkerMetrics("prefill", "prefill-0")
    start_metrics_server(9100, metrics.registry)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

PREFIX = "splitserve_worker_"  # every series: splitserve_worker_<name>{role, worker_id}
_NS = {"namespace": "splitserve", "subsystem": "worker"}
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class LoadLike(Protocol):
    num_running: int
    num_waiting: int
    kv_slot_usage: float
    prefix_hit_rate: float


@dataclass
class WorkerMetrics:
    role: str
    worker_id: str

    def __post_init__(self) -> None:
        self.registry = CollectorRegistry()
        names = ("role", "worker_id")
        labels = (self.role, self.worker_id)

        def histogram(name: str, doc: str) -> Histogram:
            h = Histogram(name, doc, names, registry=self.registry, buckets=_LATENCY_BUCKETS, **_NS)
            return h.labels(*labels)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, names, registry=self.registry, **_NS).labels(*labels)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, (*names, *extra), registry=self.registry, **_NS)

        self.ttft = histogram("time_to_first_token_seconds", "Request start to first token")
        self.itl = histogram("inter_token_latency_seconds", "Gap between streamed tokens")
        self.step_seconds = histogram(
            "engine_step_seconds", "One engine step (schedule, forward, sample), engine thread"
        )
        self.queue_depth = gauge("queue_depth", "Requests waiting for their first step")
        self.running = gauge("running_batch_size", "Requests in the running batch")
        self.kv_utilization = gauge(
            "kv_cache_utilization", "Fraction of KV token slots holding a live token"
        )
        self.prefix_hit_rate = gauge(
            "prefix_cache_hit_rate", "Prompt tokens found in the local prefix cache / queried"
        )
        self.lease_bytes = gauge("kv_lease_bytes", "Bytes of exported KV held under leases")
        self._transfer_bytes = counter(
            "kv_transfer_bytes_total", "KV bytes moved between workers", ("direction",)
        )
        self._transfer_shm_bytes = counter(
            "kv_transfer_shm_bytes_total",
            "Of kv_transfer_bytes_total, bytes that went through a same-host shared-memory file",
            ("direction",),
        )
        self.kv_transfer_seconds = histogram(
            "kv_transfer_seconds", "Decode side: one PullKV stream received and reassembled"
        )
        self._transfer_fallbacks = counter(
            "kv_transfer_fallbacks_total", "KV pulls that failed and were recomputed locally"
        )
        self._kvstore_blocks = counter(
            "kvstore_blocks_fetched_total", "Prefix blocks fetched from the kvstore and adopted"
        )
        self._kvstore_rejected = counter(
            "kvstore_blocks_rejected_total",
            "kvstore blocks refused before use (bad signature, key, shape, dtype, checksum, ...)",
            ("reason",),
        )
        self._kvstore_requests = counter(
            "kvstore_requests_total",
            "kvstore calls by outcome: ok, error, skipped while the circuit was open, or dropped "
            "(a write-back over its memory budget)",
            ("op", "outcome"),
        )
        self.kvstore_circuit_state = gauge(
            "kvstore_circuit_state",
            "The kvstore client's circuit breaker: 0 closed, 1 open (not calling), 2 half-open",
        )
        self._kvstore_circuit_opens = counter(
            "kvstore_circuit_opens_total", "Times the kvstore circuit breaker opened"
        )
        self._prompt_tokens = counter(
            "prompt_tokens_total", "Prompt tokens by how they were obtained", ("source",)
        )
        self._leases_expired = counter("kv_leases_expired_total", "Leases dropped unpulled")
        self._requests = counter("requests_total", "Finished requests by outcome", ("outcome",))
        self._labels = labels

    # ---- observations ----------------------------------------------------------------------
    def observe_load(self, load: LoadLike) -> None:
        self.queue_depth.set(load.num_waiting)
        self.running.set(load.num_running)
        self.kv_utilization.set(load.kv_slot_usage)
        self.prefix_hit_rate.set(load.prefix_hit_rate)

    def transfer_bytes(self, direction: str, n: int, shm: bool = False) -> None:
        """`direction`: "sent" (prefill) or "received" (decode); `shm`: through a file."""
        self._transfer_bytes.labels(*self._labels, direction).inc(n)
        if shm:
            self._transfer_shm_bytes.labels(*self._labels, direction).inc(n)

    def transfer_fallback(self) -> None:
        self._transfer_fallbacks.labels(*self._labels).inc()

    def kvstore_blocks_fetched(self, n: int) -> None:
        self._kvstore_blocks.labels(*self._labels).inc(n)

    def kvstore_block_rejected(self, reason: str) -> None:
        """`reason`: one of engine.kv_payload.REASONS."""
        self._kvstore_rejected.labels(*self._labels, reason).inc()

    def kvstore_request(self, op: str, outcome: str) -> None:
        """`op`: match, get or put; `outcome`: ok, error, skipped or dropped (puts only)."""
        self._kvstore_requests.labels(*self._labels, op, outcome).inc()

    def kvstore_circuit(self, state: int, opened: bool) -> None:
        """The breaker's new state (0 closed, 1 open, 2 half-open); `opened`: it just opened."""
        self.kvstore_circuit_state.set(state)
        if opened:
            self._kvstore_circuit_opens.labels(*self._labels).inc()

    def prompt_tokens(self, computed: int, cached: int) -> None:
        self._prompt_tokens.labels(*self._labels, "computed").inc(computed)
        self._prompt_tokens.labels(*self._labels, "cached").inc(cached)

    def leases_expired(self, n: int) -> None:
        self._leases_expired.labels(*self._labels).inc(n)

    def request_done(self, outcome: str) -> None:
        """`outcome`: a finish reason, or "error" / "cancelled" / "rejected"."""
        self._requests.labels(*self._labels, outcome).inc()

    def value(self, name: str, **labels: str) -> float:
        """One sample's current value (0 if absent), by its name without PREFIX: for tests."""
        got = self.registry.get_sample_value(
            PREFIX + name, {"role": self.role, "worker_id": self.worker_id, **labels}
        )
        return got or 0.0


def start_metrics_server(port: int, registry: CollectorRegistry, host: str = "127.0.0.1") -> None:
    """Serve /metrics for `registry` on a daemon thread; port 0 means metrics are off."""
    if port:
        start_http_server(port, addr=host, registry=registry)
