"""Prometheus metrics of one router, in its own registry (no process-global state).

Request counts by API and outcome, TTFT, inter-token latency, end-to-end latency, requests in
flight, token counts, routing decisions by policy and by mode (disaggregated or local) and
reason, requests moved off a failed worker (by phase and reason), requests shed by admission
control and the time admitted ones queued, and per-worker gauges read live from the worker
registry at scrape time (the admission limit among them).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .dispatch import Route
from .registry import WorkerRegistry

if TYPE_CHECKING:
    from .admission import Admission

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class RouterMetrics:
    def __init__(self, workers: WorkerRegistry, policy: str) -> None:
        self.policy = policy
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "splitserve_router_requests", "Requests by API and outcome", ["api", "status"],
            registry=r,
        )  # fmt: skip
        self.in_flight = Gauge(
            "splitserve_router_requests_in_flight", "Requests admitted and not finished", registry=r
        )
        self.ttft = Histogram(
            "splitserve_router_time_to_first_token_seconds",
            "Arrival to first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "splitserve_router_inter_token_latency_seconds",
            "Time between successive tokens of a request",
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "splitserve_router_request_latency_seconds",
            "Arrival to last token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "splitserve_router_prompt_tokens", "Prompt tokens of validated requests", registry=r
        )
        self.generation_tokens = Counter(
            "splitserve_router_generation_tokens", "Tokens relayed to clients", registry=r
        )
        self.routing = Counter(
            "splitserve_router_routing_decisions",
            "Routing decisions by policy, mode (disaggregated or local) and reason",
            ["policy", "mode", "reason"],
            registry=r,
        )
        self.migrations = Counter(
            "splitserve_router_migrations",
            "Requests moved to another worker after one failed, by phase (prefill, "
            "before_first_token, mid_stream: resumed from the tokens sent) and reason "
            "(unavailable, health_check, idle_timeout, stream_incomplete, worker_full)",
            ["phase", "reason"],
            registry=r,
        )
        self.shed = Counter(
            "splitserve_router_requests_shed",
            "Requests refused by admission control (429): queue_full, queue_timeout",
            ["reason"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "splitserve_router_queue_wait_seconds",
            "Time an admitted request waited for a decode worker with room",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queued = Gauge(
            "splitserve_router_requests_queued",
            "Requests waiting for a decode worker with room",
            registry=r,
        )
        self._collector = _WorkerCollector(workers)
        r.register(self._collector)

    def bind_admission(self, admission: Admission) -> None:
        """Read the queue length and the per-worker limits live from admission control."""
        self.queued.set_function(lambda: admission.num_queued)
        self._collector.admission = admission

    def observe_route(self, route: Route) -> None:
        self.routing.labels(self.policy, route.mode, route.reason).inc()

    def observe_migration(self, phase: str, reason: str) -> None:
        self.migrations.labels(phase, reason).inc()

    def observe_shed(self, reason: str) -> None:
        self.shed.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _WorkerCollector(Collector):
    """Per-worker gauges, read from the registry when scraped so they can never go stale."""

    def __init__(self, workers: WorkerRegistry) -> None:
        self.workers = workers
        self.admission: Admission | None = None

    def collect(self) -> Iterator[Metric]:
        labels = ["worker", "role"]
        tokens = GaugeMetricFamily(
            "splitserve_router_worker_outstanding_tokens",
            "Tokens the router has sent a worker and not seen done",
            labels=labels,
        )
        requests = GaugeMetricFamily(
            "splitserve_router_worker_outstanding_requests",
            "Requests the router has in flight on a worker",
            labels=labels,
        )
        healthy = GaugeMetricFamily(
            "splitserve_router_worker_healthy", "1 if the last health check passed", labels=labels
        )
        kv_usage = GaugeMetricFamily(
            "splitserve_router_worker_kv_usage", "KV pool use the worker reported", labels=labels
        )
        limits = GaugeMetricFamily(
            "splitserve_router_worker_request_limit",
            "Requests admission control lets a decode worker have in flight (absent: none)",
            labels=labels,
        )
        for w in self.workers.workers:
            key = [w.address, w.role]
            tokens.add_metric(key, w.load.tokens)
            requests.add_metric(key, w.load.requests)
            healthy.add_metric(key, 1.0 if w.healthy else 0.0)
            if w.reported is not None:
                kv_usage.add_metric(key, w.reported.kv_usage)
            limit = self.admission.limit(w) if self.admission is not None else None
            if limit is not None and w.role != "prefill":
                limits.add_metric(key, limit)
        changes = CounterMetricFamily(
            "splitserve_router_worker_pool_changes",
            "Workers that joined (registered), left (deregistered) or were dropped (failed "
            "health checks) at runtime",
            labels=["event"],
        )
        for event, count in self.workers.events.items():
            changes.add_metric([event], count)
        yield from (tokens, requests, healthy, kv_usage, limits, changes)
