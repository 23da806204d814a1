"""Worker pools: one reused channel per worker, periodic grpc.health.v1 checks, load counters.

    registry = WorkerRegistry(prefill=["10.0.0.1:50061"], decode=["10.0.0.2:50071"])
    await registry.check_all()            # once before serving
    registry.start()                      # then every `health_interval` seconds
    workers = registry.healthy(PREFILL)   # what a policy chooses among

A worker that fails a check (or an RPC with UNAVAILABLE) leaves selection until a later check
passes; its prefix guesses are dropped, since a restarted worker has an empty cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve.services.server import CHANNEL_OPTIONS
from splitserve.services.tracing import inject_metadata
from splitserve.v1 import pb, rpc

from .prefix_index import DEFAULT_CAPACITY_BLOCKS, PrefixIndex

log = logging.getLogger("splitserve.router")

PREFILL, DECODE, COLOCATED = "prefill", "decode", "colocated"
ROLES = (PREFILL, DECODE, COLOCATED)


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

    def release(self) -> None:
        if self._open:
            self._open = False
            self.worker.load.tokens -= self.tokens
            self.worker.load.requests -= 1
            self.tokens = 0

    def __enter__(self) -> LoadTicket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Worker:
    def __init__(
        self, address: str, role: str, prefix_capacity: int = DEFAULT_CAPACITY_BLOCKS
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"unknown worker role {role!r}")
        self.address = address
        self.role = role
        self.healthy = False
        self.load = LoadCounter()
        self.prefixes = PrefixIndex(prefix_capacity)
        self.reported: pb.WorkerLoad | None = None  # last GetLoad answer, for metrics
        self._channel: grpc.aio.Channel | None = None
        self._stubs: dict[type, object] = {}

    def __repr__(self) -> str:
        return f"Worker({self.address}, {self.role}, healthy={self.healthy})"

    @property
    def channel(self) -> grpc.aio.Channel:
        # Created on first use so that pure-bookkeeping tests need no event loop.
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
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
        self.healthy = healthy

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stubs.clear()


class WorkerRegistry:
    def __init__(
        self,
        prefill: Iterable[str] = (),
        decode: Iterable[str] = (),
        colocated: Iterable[str] = (),
        health_interval: float = 2.0,
        health_timeout: float = 1.0,
        prefix_capacity: int = DEFAULT_CAPACITY_BLOCKS,
    ) -> None:
        self.health_interval = health_interval
        self.health_timeout = health_timeout
        self.workers: list[Worker] = []
        seen: set[str] = set()
        for role, addresses in ((PREFILL, prefill), (DECODE, decode), (COLOCATED, colocated)):
            for address in addresses:
                _check_address(address)
                if address in seen:
                    raise ValueError(f"worker {address} is listed twice")
                seen.add(address)
                self.workers.append(Worker(address, role, prefix_capacity))
        self._task: asyncio.Task[None] | None = None

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
        await asyncio.gather(*(self._check(w) for w in self.workers))

    async def _check(self, worker: Worker) -> None:
        stub = worker.stub(health_pb2_grpc.HealthStub)
        try:
            reply = await stub.Check(
                health_pb2.HealthCheckRequest(service=""),
                timeout=self.health_timeout,
                metadata=inject_metadata(),
            )
            healthy = reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError:
            healthy = False
        worker.set_healthy(healthy)
        if healthy:
            await self._refresh_load(worker)

    async def _refresh_load(self, worker: Worker) -> None:
        stub = worker.prefill_stub if worker.role == PREFILL else worker.decode_stub
        try:
            worker.reported = await stub.GetLoad(
                pb.LoadRequest(), timeout=self.health_timeout, metadata=inject_metadata()
            )
        except grpc.aio.AioRpcError:
            worker.reported = None  # load reports are for metrics only; health decides

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
        await asyncio.gather(*(w.close() for w in self.workers))


def _check_address(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"worker address must be HOST:PORT; got {address!r}")


def _word(healthy: bool) -> str:
    return "healthy" if healthy else "unhealthy"
