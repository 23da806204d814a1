"""The workers' client for the kvstore: a cache that may be down, so never a dependency.

Every call has a deadline, and any failure (unreachable, slow, an error status) becomes a miss:
the worker recomputes instead of failing. A circuit breaker bounds what an outage costs: after
`failure_threshold` consecutive failures it opens, and calls return misses at once, without an
RPC, for `backoff_s`; then one call goes through as a probe (half-open): if it succeeds the
circuit closes, if it fails the wait doubles, up to `max_backoff_s`. So a dead store costs
nothing per request, a stopped one (SIGSTOP: connections accepted, never answered) costs one
deadline per probe, and the outage is logged once, not once per call. `put_background` queues
writes on a bounded queue and drops them when it is full: storing a block is never worth
delaying a request. With `metrics`, calls are counted by outcome and the breaker's state is
published (workers/metrics.py).

    client = KVStoreClient("127.0.0.1:50060")
    n = await client.match(keys)              # leading keys present
    payloads = await client.get(keys[:n])     # bytes or None, in order
    client.put_background([(key, payload)])   # fire and forget
    await client.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc

from splitserve.services.security import TLSConfig, open_channel
from splitserve.services.server import CHANNEL_OPTIONS
from splitserve.services.tracing import inject_metadata
from splitserve.v1 import pb, rpc

log = logging.getLogger("splitserve")

MAX_KEYS_PER_REQUEST = 4096  # the kvstore's default limit
# gRPC's reconnect backoff grows to 120 s by default: after a long outage the store would stay
# unused for up to two minutes after it came back. A cache is worth reconnecting to promptly.
_CHANNEL_OPTIONS = [*CHANNEL_OPTIONS, ("grpc.max_reconnect_backoff_ms", 5_000)]


# A queued background put: the blocks, the trace context of the request that wrote them, and
# their payload bytes (counted against QUEUE_BYTES until sent).
_PutJob = tuple[list[tuple[bytes, bytes]], tuple[tuple[str, str], ...], int]


@dataclass
class KVClientCounters:
    hits: int = 0
    misses: int = 0
    bytes_fetched: int = 0
    errors: int = 0  # failed RPCs
    skipped: int = 0  # calls answered as misses without an RPC while backing off
    puts: int = 0  # blocks the store accepted
    dropped_puts: int = 0  # blocks dropped: queue full, store down, or the put failed


PUT_MIN_BYTES_PER_S = 50e6  # below this a store is too slow to be worth writing to
# Payload bytes waiting in the background writer's queue, at most this many: past it a put is
# dropped (and counted) instead of queued, so a store slower than the prompts coming in costs
# cache hits, not the worker's memory. A put is always queued when the queue is empty.
QUEUE_BYTES = 256 << 20


class KVStoreObserver(Protocol):
    """What the client reports to (services.metrics.WorkerMetrics)."""

    def kvstore_request(self, op: str, outcome: str) -> None: ...
    def kvstore_circuit(self, state: int, opened: bool) -> None: ...


class CircuitBreaker:
    """Closed -> (failure_threshold consecutive failures) -> open for a backoff -> half-open:
    one probe call -> closed on success, open again with twice the backoff (up to the cap) on
    failure. Not thread-safe: one event loop owns it."""

    CLOSED, OPEN, HALF_OPEN = 0, 1, 2

    def __init__(
        self,
        failure_threshold: int = 1,
        backoff_s: float = 2.0,
        max_backoff_s: float = 30.0,
        on_change: Callable[[int, bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1 or backoff_s <= 0 or max_backoff_s < backoff_s:
            raise ValueError("need failure_threshold >= 1 and 0 < backoff_s <= max_backoff_s")
        self.failure_threshold = failure_threshold
        self.base_backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.backoff_s = backoff_s  # the current open period
        self.state = self.CLOSED
        self.failures = 0  # consecutive
        self.opens = 0
        self._reopen_at = 0.0
        self._probing = False
        self._on_change = on_change
        self._clock = clock

    @property
    def ready(self) -> bool:
        """Whether a call now would go through (without letting it)."""
        if self.state == self.CLOSED:
            return True
        if self.state == self.OPEN:
            return self._clock() >= self._reopen_at
        return not self._probing

    def allow(self) -> bool:
        """True: make the call (and report its outcome). False: answer without calling."""
        if self.state == self.OPEN and self._clock() >= self._reopen_at:
            self._set(self.HALF_OPEN)
        if self.state == self.HALF_OPEN:
            if self._probing:
                return False
            self._probing = True
        return self.state != self.OPEN

    def record_success(self) -> None:
        self.failures = 0
        self._probing = False
        self.backoff_s = self.base_backoff_s
        if self.state != self.CLOSED:
            self._set(self.CLOSED)

    def record_failure(self) -> None:
        self.failures += 1
        self._probing = False
        if self.state == self.HALF_OPEN:  # the probe (or a late call) failed: wait longer
            self.backoff_s = min(2 * self.backoff_s, self.max_backoff_s)
            self._open()
        elif self.state == self.CLOSED and self.failures >= self.failure_threshold:
            self._open()
        # already open: calls that started before it opened change nothing

    def release(self) -> None:
        """A call that ended with no outcome (cancelled): let another probe through."""
        self._probing = False

    def _open(self) -> None:
        self._reopen_at = self._clock() + self.backoff_s
        self.opens += 1
        self._set(self.OPEN, opened=True)

    def _set(self, state: int, opened: bool = False) -> None:
        self.state = state
        if self._on_change is not None:
            self._on_change(state, opened)


class KVStoreClient:
    def __init__(
        self,
        address: str,
        timeout_s: float = 0.5,
        backoff_s: float = 2.0,
        put_timeout_s: float = 2.0,
        queue_size: int = 64,
        *,
        queue_bytes: int = QUEUE_BYTES,
        max_backoff_s: float = 30.0,
        failure_threshold: int = 1,
        metrics: KVStoreObserver | None = None,
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.put_timeout_s = put_timeout_s
        self.counters = KVClientCounters()
        self.metrics = metrics
        self.breaker = CircuitBreaker(
            failure_threshold,
            backoff_s,
            max(backoff_s, max_backoff_s),
            on_change=metrics.kvstore_circuit if metrics is not None else None,
        )
        self._queue_size = queue_size
        self._queue_bytes = queue_bytes
        self._queued_bytes = 0
        self._queue: asyncio.Queue[_PutJob] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: rpc.KVStoreStub | None = None
        self._is_down = False

    # ---- health ---------------------------------------------------------------------------
    @property
    def is_healthy(self) -> bool:
        """Whether a call now would reach the store (the circuit is closed or due a probe)."""
        return self.breaker.ready

    def _skip(self, op: str) -> bool:
        """True when the circuit is open: the call should answer a miss without an RPC."""
        if self.breaker.allow():
            return False
        self.counters.skipped += 1
        self._observe(op, "skipped")
        return True

    def _failed(self, op: str, exc: Exception) -> None:
        self.counters.errors += 1
        self.breaker.record_failure()
        self._observe(op, "error")
        if not self._is_down and self.breaker.state != CircuitBreaker.CLOSED:
            self._is_down = True
            log.warning(
                "kvstore %s: %s failed (%s); treating it as empty for %.1fs, then probing it "
                "(the wait doubles, up to %.0fs, while it keeps failing)",
                self.address,
                op,
                _describe(exc),
                self.breaker.backoff_s,
                self.breaker.max_backoff_s,
            )

    def _succeeded(self, op: str) -> None:
        self.breaker.record_success()
        self._observe(op, "ok")
        if self._is_down:
            self._is_down = False
            log.info("kvstore %s: answering again", self.address)

    def _observe(self, op: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.kvstore_request(op, outcome)

    def _rpc(self) -> rpc.KVStoreStub:
        # Created on first use, inside the event loop the channel will belong to.
        if self._stub is None:
            # Mutual TLS with this worker's certificate when it has one (security.py).
            self._channel = open_channel(self.address, TLSConfig.from_env(), _CHANNEL_OPTIONS)
            self._stub = rpc.KVStoreStub(self._channel)
        return self._stub

    # ---- reads ----------------------------------------------------------------------------
    async def match(self, keys: Sequence[bytes]) -> int:
        """How many leading keys the store holds; 0 when it is down or slow."""
        if not keys or self._skip("match"):
            return 0
        request = pb.MatchRequest(keys=keys[:MAX_KEYS_PER_REQUEST])
        try:
            response = await self._rpc().Match(
                request, timeout=self.timeout_s, metadata=inject_metadata()
            )
        except (grpc.RpcError, OSError) as exc:
            self._failed("match", exc)
            return 0
        except BaseException:  # cancelled with the request: no verdict on the store
            self.breaker.release()
            raise
        self._succeeded("match")
        return min(response.num_matched, len(request.keys))

    async def get(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """Payloads in key order, None for a miss; what arrived before a failure is kept."""
        out: dict[bytes, bytes] = {}
        if keys and not self._skip("get"):
            try:
                await self._fetch(keys[:MAX_KEYS_PER_REQUEST], out)
            except (grpc.RpcError, OSError) as exc:
                self._failed("get", exc)
            except BaseException:
                self.breaker.release()
                raise
            else:
                self._succeeded("get")
        values = [out.get(k) for k in keys]
        self._count_reads(values)
        return values

    async def _fetch(self, keys: Sequence[bytes], out: dict[bytes, bytes]) -> None:
        # One deadline for the whole stream: past it, recomputing is the faster path anyway.
        call = self._rpc().Get(
            pb.GetRequest(keys=keys), timeout=self.timeout_s, metadata=inject_metadata()
        )
        async for block in call:
            if not block.missing:
                out[block.key] = block.payload

    def _count_reads(self, values: list[bytes | None]) -> None:
        hits = [v for v in values if v is not None]
        self.counters.hits += len(hits)
        self.counters.misses += len(values) - len(hits)
        self.counters.bytes_fetched += sum(len(v) for v in hits)

    # ---- writes ---------------------------------------------------------------------------
    async def put(
        self,
        items: Sequence[tuple[bytes, bytes]],
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> int:
        """Stores (key, payload) pairs; returns how many the store accepted (0 on failure).

        `metadata`: the trace context to send (default: the current one)."""
        if not items:
            return 0
        if self._skip("put"):
            self.counters.dropped_puts += len(items)
            return 0
        try:
            response = await self._rpc().Put(
                _blocks(items),
                # long prompts write back hundreds of MB: the deadline grows with the bytes
                timeout=self.put_timeout_s + sum(len(p) for _, p in items) / PUT_MIN_BYTES_PER_S,
                metadata=inject_metadata() if metadata is None else metadata,
            )
        except (grpc.RpcError, OSError) as exc:
            self._failed("put", exc)
            self.counters.dropped_puts += len(items)
            return 0
        except BaseException:
            self.breaker.release()
            raise
        self._succeeded("put")
        self.counters.puts += response.num_stored
        return response.num_stored

    def put_background(self, items: Sequence[tuple[bytes, bytes]]) -> bool:
        """Queues a put without waiting; False (and dropped) when the queue is full, in
        puts or in bytes (QUEUE_BYTES)."""
        if not items:
            return True
        queue = self._writer_queue()
        nbytes = sum(len(p) for _, p in items)
        try:
            if self._queued_bytes and self._queued_bytes + nbytes > self._queue_bytes:
                raise asyncio.QueueFull
            # The caller's trace context travels with its blocks: the writer task serves
            # every request, so its own context belongs to none of them.
            queue.put_nowait((list(items), inject_metadata(), nbytes))
        except asyncio.QueueFull:
            self.counters.dropped_puts += len(items)
            self._observe("put", "dropped")
            return False
        self._queued_bytes += nbytes
        return True

    def _writer_queue(self) -> asyncio.Queue[_PutJob]:
        if self._queue is None:
            self._queue = asyncio.Queue(self._queue_size)
            # A fresh context: created inside the first caller's span, the task would
            # otherwise keep that span current for good (and parent every later Put on it).
            self._writer = asyncio.create_task(
                self._write_loop(self._queue), context=contextvars.Context()
            )
        return self._queue

    async def _write_loop(self, queue: asyncio.Queue[_PutJob]) -> None:
        while True:
            items, metadata, nbytes = await queue.get()
            try:
                await self.put(items, metadata)
            except Exception:  # a bug must not kill the writer and silently stop all puts
                log.exception("kvstore %s: background put failed", self.address)
                self.counters.dropped_puts += len(items)
            finally:
                self._queued_bytes -= nbytes
                queue.task_done()

    async def flush(self, timeout_s: float = 5.0) -> bool:
        """Waits for queued puts to be sent (or dropped); False if that took over timeout_s."""
        if self._queue is None:
            return True
        try:
            await asyncio.wait_for(self._queue.join(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Stops the background writer (queued puts are dropped) and closes the channel."""
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None
        if self._queue is not None:
            while not self._queue.empty():
                self.counters.dropped_puts += len(self._queue.get_nowait()[0])
            self._queue = None
            self._queued_bytes = 0
        if self._channel is not None:
            await self._channel.close()
            self._channel, self._stub = None, None


def _blocks(items: Sequence[tuple[bytes, bytes]]) -> Iterator[pb.BlockPayload]:
    for key, payload in items:
        yield pb.BlockPayload(key=key, payload=payload)


def _describe(exc: Exception) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"
