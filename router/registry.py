"""Worker pools: one reused channel per worker, periodic grpc.health.v1 checks, load counters.

    registry = WorkerRegistry(prefill=["10.0.0.1:50061"], decode=["10.0.0.2:50071"])
    await registry.check_all()            # once before serving
    registry.start()                      # then every `health_interval` seconds
    workers = registry.healthy(PREFILL)   # what a policy chooses among
    await registry.register("10.0.0.3:50072", DECODE)   # data parallelism: replicas join ...
    registry.remove("10.0.0.3:50072")                   # ... and leave at runtime

A worker that fails a check (or an RPC with UNAVAILABLE) leaves selection until a later check
passes; its prefix guesses are dropped, since a restarted worker has an empty cache. A failed
check also tells the calls in flight on that worker (`Worker.wait_down`), so a stream that got
nothing from it during the check can give up on a hung worker at once (router/dispatch.py).

Each worker's load as the router counts it (`LoadTicket`s) and its capacity as it reports it
(GetLoad) feed the router's admission control; `on_change` listeners hear of every change that
may free room (a ticket released, a worker healthy again, a new report).

Workers given on the command line are *static*: they stay in the pool whatever happens, since
they may come back. Workers that joined at runtime (`add`, `register`) are *dynamic*: one that
fails `drop_after_failures` health checks in a row is dropped, and it has to register again.
Removing a worker takes it out of selection at once, but its channel stays open until the
requests already on it have finished (they hold the `Worker`, and finish or fail normally).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve.services.security import TLSConfig, open_channel
from splitserve.services.server import CHANNEL_OPTIONS
from splitserve.services.tracing import inject_metadata
from splitserve.v1 import pb, rpc

from .prefix_index import DEFAULT_CAPACITY_BLOCKS, PrefixIndex

log = logging.getLogger("splitserve.router")

PREFILL, DECODE, COLOCATED = "prefill", "decode", "colocated"
ROLES = (PREFILL, DECODE, COLOCATED)
DROP_AFTER_FAILURES = 3  # consecutive failed health checks before a dynamic worker is dropped


@dataclass
class LoadCounter:
    """What the router has sent a worker and not yet seen finish."""

    tokens: int = 0
    requests: int = 0


class LoadTicket:
    """One request's share of a worker's load: added on dispatch, removed exactly once.

    Use as a context manager so every exit (finish, error, client gone, abort) releases it.
    """

    def __init__(self, worker: Worker, tokens: int) -> None:
        self.worker = worker
        self.tokens = max(0, tokens)
        self._open = True
        worker.load.tokens += self.tokens
        worker.load.requests += 1

    def consume(self, num_tokens: int) -> None:
        """The worker has done `num_tokens` of the work: count them off early."""
        n = min(self.tokens, max(0, num_tokens))
        self.tokens -= n
        self.worker.load.tokens -= n

    @property
    def is_open(self) -> bool:
        return self._open

    def release(self) -> None:
        if self._open:
            self._open = False
            self.worker.load.tokens -= self.tokens
            self.worker.load.requests -= 1
            self.tokens = 0
            if self.worker.removed and self.worker.load.requests == 0:
                self.worker.close_soon()  # the last request on a removed worker is done
            self.worker.changed()  # room for a queued request, perhaps

    def __enter__(self) -> LoadTicket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


_CLOSING: set[asyncio.Task[None]] = set()


class Worker:
    def __init__(
        self,
        address: str,
        role: str,
        prefix_capacity: int = DEFAULT_CAPACITY_BLOCKS,
        static: bool = True,
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"unknown worker role {role!r}")
        self.address = address
        self.role = role
        self.static = static  # from the command line: never dropped for failing checks
        self.healthy = False
        self.failures = 0  # consecutive failed health checks
        self.removed = False  # out of the pool; the channel closes once no request uses it
        self.load = LoadCounter()
        self.prefixes = PrefixIndex(prefix_capacity)
        self.reported: pb.WorkerLoad | None = None  # last GetLoad answer: metrics, capacity
        self.on_change: Callable[[], None] | None = None  # set by the registry
        self._channel: grpc.aio.Channel | None = None
        self._stubs: dict[type, object] = {}
        # Calls waiting to hear that a health check of this worker failed (see wait_down).
        self._down_waiters: set[asyncio.Future[float]] = set()

    def __repr__(self) -> str:
        return f"Worker({self.address}, {self.role}, healthy={self.healthy})"

    @property
    def channel(self) -> grpc.aio.Channel:
        # Created on first use so that pure-bookkeeping tests need no event loop.
        if self._channel is None:
            # Mutual TLS with the router's own certificate when it has one (security.py).
            self._channel = open_channel(self.address, TLSConfig.from_env(), CHANNEL_OPTIONS)
        return self._channel

    @property
    def prefill_stub(self) -> rpc.PrefillStub:
        return self.stub(rpc.PrefillStub)

    @property
    def decode_stub(self) -> rpc.DecodeStub:
        return self.stub(rpc.DecodeStub)

    def stub(self, kind: type) -> Any:
        if kind not in self._stubs:
            self._stubs[kind] = kind(self.channel)
        return self._stubs[kind]

    def track(self, tokens: int) -> LoadTicket:
        return LoadTicket(self, tokens)

    def set_healthy(self, healthy: bool) -> None:
        if healthy != self.healthy:
            log.info("worker %s (%s) is %s", self.address, self.role, _word(healthy))
        if not healthy:
            self.prefixes.clear()
        came_back = healthy and not self.healthy
        self.healthy = healthy
        if came_back:
            self.changed()

    def changed(self) -> None:
        """Its load, health or capacity changed: tell the registry's listeners."""
        if self.on_change is not None:
            self.on_change()

    # ---- failure notices for calls in flight ---------------------------------------------------
    def wait_down(self) -> asyncio.Future[float]:
        """A future that resolves, with the time.monotonic() at which the failed check began,
        when a health check of this worker next fails. Cancel it when no longer interested."""
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._down_waiters.add(fut)
        fut.add_done_callback(self._down_waiters.discard)
        return fut

    def note_down(self, check_started: float) -> None:
        """A health check that began at `check_started` failed: tell the calls in flight."""
        for fut in list(self._down_waiters):
            if not fut.done():
                fut.set_result(check_started)

    def close_soon(self) -> None:
        """Close the channel in the background (from synchronous code, inside the loop)."""
        if self._channel is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop: nothing can be using the channel either
            return
        task = loop.create_task(self.close())
        _CLOSING.add(task)  # a strong reference until done (the loop keeps only weak ones)
        task.add_done_callback(_CLOSING.discard)

    async def close(self) -> None:
        if self._channel is not None:
            channel, self._channel = self._channel, None
            self._stubs.clear()
            await channel.close()


class WorkerRegistry:
    def __init__(
        self,
        prefill: Iterable[str] = (),
        decode: Iterable[str] = (),
        colocated: Iterable[str] = (),
        health_interval: float = 2.0,
        health_timeout: float = 1.0,
        prefix_capacity: int = DEFAULT_CAPACITY_BLOCKS,
        drop_after_failures: int = DROP_AFTER_FAILURES,
    ) -> None:
        if drop_after_failures < 1:
            raise ValueError("drop_after_failures must be at least 1")
        self.health_interval = health_interval
        self.health_timeout = health_timeout
        self.prefix_capacity = prefix_capacity
        self.drop_after_failures = drop_after_failures
        self.workers: list[Worker] = []
        # Pool changes since start, by event: added, removed, dropped (for metrics).
        self.events: dict[str, int] = {"added": 0, "removed": 0, "dropped": 0}
        seen: set[str] = set()
        for role, addresses in ((PREFILL, prefill), (DECODE, decode), (COLOCATED, colocated)):
            for address in addresses:
                check_address(address)
                if address in seen:
                    raise ValueError(f"worker {address} is listed twice")
                seen.add(address)
                self.workers.append(self._new_worker(address, role, static=True))
        self._task: asyncio.Task[None] | None = None
        self._retired: set[Worker] = set()  # removed, with requests still on them
        # Called whenever a worker may have room for more (admission control wakes its queue).
        self.listeners: list[Callable[[], None]] = []

    def _new_worker(self, address: str, role: str, static: bool) -> Worker:
        worker = Worker(address, role, self.prefix_capacity, static=static)
        worker.on_change = self._changed
        return worker

    def _changed(self) -> None:
        for listener in list(self.listeners):
            listener()

    def get(self, address: str) -> Worker | None:
        return next((w for w in self.workers if w.address == address), None)

    # ---- the pool changing at runtime ----------------------------------------------------------
    def add(self, address: str, role: str) -> tuple[Worker, bool]:
        """Put a worker in `role`'s pool (unhealthy until a check passes); idempotent.

        Returns the worker and whether it is new. The same address with another role (the
        worker was restarted as something else) replaces the old entry; a static entry stays
        static. Raises ValueError for a bad address or role.
        """
        check_address(address)
        if role not in ROLES:
            raise ValueError(f"unknown worker role {role!r}; one of {', '.join(ROLES)}")
        old = self.get(address)
        if old is not None and old.role == role:
            return old, False
        static = old is not None and old.static
        if old is not None:
            self._retire(old)
        worker = self._new_worker(address, role, static=static)
        self.workers.append(worker)
        self.events["added"] += 1
        log.info("worker %s (%s) joined the pool", address, role)
        return worker, True

    async def register(self, address: str, role: str) -> tuple[Worker, bool]:
        """`add`, then one health check right away, so a healthy worker gets traffic now."""
        worker, added = self.add(address, role)
        await self._check(worker)
        return worker, added

    def remove(self, address: str) -> bool:
        """Take a worker out of its pool now; False if it wasn't in one.

        Nothing a request holds is released: a stream already running on it goes on over the
        same channel (finishing or failing as it would have), and its `LoadTicket` still counts
        off the removed worker. The channel closes once the last such request is done.
        """
        worker = self.get(address)
        if worker is None:
            return False
        self._retire(worker)
        self.events["removed"] += 1
        log.info("worker %s (%s) left the pool", address, worker.role)
        return True

    def deregister(self, address: str) -> bool:
        """A worker said it is leaving (draining): dynamic ones are removed; static ones stay
        listed but out of selection until a health check finds them SERVING again (a restart).
        """
        worker = self.get(address)
        if worker is None:
            return False
        if worker.static:
            worker.set_healthy(False)
            log.info("worker %s (%s) deregistered; kept as a listed worker", address, worker.role)
            return True
        return self.remove(address)

    def _retire(self, worker: Worker) -> None:
        self.workers.remove(worker)
        worker.removed = True
        worker.healthy = False
        worker.prefixes.clear()
        if worker.load.requests == 0:
            worker.close_soon()
        else:
            self._retired.add(worker)  # LoadTicket.release closes it; close() as a backstop

    def pool(self, role: str) -> list[Worker]:
        """Workers that can serve `role`: colocated workers decode (and prefill locally)."""
        if role == DECODE:
            return [w for w in self.workers if w.role in (DECODE, COLOCATED)]
        return [w for w in self.workers if w.role == role]

    def healthy(self, role: str) -> list[Worker]:
        return [w for w in self.pool(role) if w.healthy]

    def has_healthy_decoder(self) -> bool:
        return bool(self.healthy(DECODE))

    def mark_failed(self, worker: Worker) -> None:
        """An RPC said UNAVAILABLE: stop choosing it until a health check passes again."""
        worker.set_healthy(False)

    async def check_all(self) -> None:
        # A copy: workers may join or leave while the checks are out.
        await asyncio.gather(*(self._check(w) for w in list(self.workers)))
        self._drop_dead()
        self._retired = {w for w in self._retired if w.load.requests}

    def _drop_dead(self) -> None:
        for w in list(self.workers):
            if not w.static and w.failures >= self.drop_after_failures:
                log.warning(
                    "dropping worker %s (%s): %d health checks failed in a row",
                    w.address, w.role, w.failures,
                )  # fmt: skip
                self._retire(w)
                self.events["dropped"] += 1

    async def _check(self, worker: Worker) -> None:
        if worker.removed:
            return  # left before its turn; its channel may be closed already (not reopened)
        stub = worker.stub(health_pb2_grpc.HealthStub)
        started = time.monotonic()
        try:
            reply = await stub.Check(
                health_pb2.HealthCheckRequest(service=""),
                timeout=self.health_timeout,
                metadata=inject_metadata(),
            )
            healthy = reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError:
            healthy = False
        if worker.removed:
            return  # it left while the check was out
        worker.failures = 0 if healthy else worker.failures + 1
        worker.set_healthy(healthy)
        if healthy:
            await self._refresh_load(worker)
        else:
            worker.note_down(started)

    async def _refresh_load(self, worker: Worker) -> None:
        stub = worker.prefill_stub if worker.role == PREFILL else worker.decode_stub
        try:
            reported = await stub.GetLoad(
                pb.LoadRequest(), timeout=self.health_timeout, metadata=inject_metadata()
            )
        except grpc.aio.AioRpcError:
            return  # keep the last report (its capacity still holds); health decides
        first = worker.reported is None
        worker.reported = reported
        if first:
            worker.changed()  # its capacity is known now

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="router-health")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval)
            try:
                await self.check_all()
            except Exception:  # one bad round must not end health checking for good
                log.exception("health check round failed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await asyncio.gather(*(w.close() for w in [*self.workers, *self._retired]))
        self._retired.clear()


def check_address(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"worker address must be HOST:PORT; got {address!r}")


def _word(healthy: bool) -> str:
    return "healthy" if healthy else "unhealthy"
