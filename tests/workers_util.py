"""Shared by the worker tests: a tiny random-weight engine, and starting workers as processes."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from models import TINY
from ports import free_port

from splitserve.engine.config import EngineConfig
from splitserve.engine.engine import LLMEngine
from splitserve.executors.build import create_random_engine
from splitserve.services.server import CHANNEL_OPTIONS
from splitserve.v1 import pb, rpc
from splitserve.workers.engine_loop import AsyncEngine
from splitserve.workers.kv_prefix import PrefixTier
from splitserve.workers.metrics import WorkerMetrics
from splitserve.workers.worker import Worker


def tiny_engine(num_blocks: int = 32, **overrides) -> LLMEngine:
    """Random weights seeded by the config: two of these with the same seed are the same model."""
    cfg = {"num_kv_blocks": num_blocks, "block_size": 4, "max_num_batched_tokens": 32, **overrides}
    return create_random_engine(TINY, EngineConfig(**cfg))


def tokens(responses: list[pb.DecodeResponse]) -> list[int]:
    """Every token id a decode stream sent, in order."""
    return [t for r in responses for t in r.token_ids]


def assert_idle(served) -> None:
    """A served worker holds no request and no KV block, and its block manager is sound."""
    bm = served.worker.engine.engine.block_manager
    bm.check_integrity()
    assert bm.num_free_blocks == bm.num_blocks
    assert served.worker.engine.num_live_requests == 0


def prompt(n: int, offset: int = 0) -> list[int]:
    return [(i * 7 + offset) % 120 + 3 for i in range(n)]


@dataclass
class WorkerProcess:
    """A worker started as `python -m splitserve.<module> ...`, its log kept for failures."""

    module: str
    args: list[str]
    port: int = field(default_factory=free_port)
    metrics_port: int = 0
    proc: subprocess.Popen | None = None
    log_path: str = ""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, log_dir: str) -> WorkerProcess:
        self.log_path = os.path.join(log_dir, f"{self.module}-{self.port}.log")
        cmd = [sys.executable, "-m", f"splitserve.{self.module}", "--port", str(self.port)]
        env = {**os.environ, "SPLITSERVE_OTEL_EXPORTER": "none"}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*cmd, *self.args], stdout=log, stderr=subprocess.STDOUT, env=env
            )
        return self

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-4000:]

    def wait_serving(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise AssertionError(f"{self.module} exited early:\n{self.log()}")
                if health_status(stub) == health_pb2.HealthCheckResponse.SERVING:
                    return
                time.sleep(0.25)
        raise AssertionError(f"{self.module} not SERVING after {timeout}s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def health_status(stub: health_pb2_grpc.HealthStub) -> int | None:
    try:
        return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
    except grpc.RpcError:
        return None


# ---- workers served in this process (tiny engines: mechanics, fast) ---------------------------
@dataclass
class Served:
    server: grpc.aio.Server
    servicer: object
    worker: Worker
    address: str

    async def stop(self) -> None:
        await self.server.stop(grace=None)
        await self.servicer.close()  # type: ignore[attr-defined]
        await self.worker.engine.shutdown()


async def _serve(role: str, engine: LLMEngine, store, make, add) -> Served:
    metrics = WorkerMetrics(role, f"{role}-test")
    aengine = AsyncEngine(engine, metrics=metrics)
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    port = server.add_insecure_port("127.0.0.1:0")
    address = f"127.0.0.1:{port}"
    worker = Worker(
        argparse.Namespace(), role, f"{role}-test", address, aengine, metrics,
        PrefixTier(aengine, store, metrics),
    )  # fmt: skip
    servicer = make(worker)
    add(servicer, server)
    await aengine.start()
    await server.start()
    await servicer.start()
    return Served(server, servicer, worker, address)


@contextlib.asynccontextmanager
async def running(served: Awaitable[Served]) -> AsyncIterator[Served]:
    """`async with running(serve_prefill(...)) as w:` stops the worker however the test ends."""
    worker = await served
    try:
        yield worker
    finally:
        await worker.stop()


async def serve_prefill(engine: LLMEngine, store=None, max_lease_bytes=1 << 30, ttl_s=30.0, **kw):
    from splitserve.prefill.leases import LeaseTable
    from splitserve.prefill.service import PrefillServicer, add_prefill_service

    def make(worker: Worker) -> PrefillServicer:
        leases = LeaseTable(max_lease_bytes, ttl_s, on_change=worker.metrics.lease_bytes.set)
        return PrefillServicer(worker, leases, **kw)

    return await _serve("prefill", engine, store, make, add_prefill_service)


async def serve_decode(engine: LLMEngine, store=None, role: str = "decode", **kw) -> Served:
    from splitserve.decode.service import DecodeServicer

    def make(worker: Worker) -> DecodeServicer:
        return DecodeServicer(worker, **kw)

    return await _serve(role, engine, store, make, rpc.add_DecodeServicer_to_server)


def aio_channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
