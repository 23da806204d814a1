"""WorkerRegistry against a real grpc.aio server with grpc.health.v1: a worker leaves selection
when it stops SERVING or goes away, and comes back when healthy again."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from splitserve.router.registry import COLOCATED, DECODE, PREFILL, WorkerRegistry

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health_server() -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, servicer, port


def test_health_checks_drop_and_readd_workers() -> None:
    async def scenario() -> None:
        server, servicer, port = await health_server()
        registry = WorkerRegistry(decode=[f"127.0.0.1:{port}"], health_timeout=0.5)
        try:
            await servicer.set("", SERVING)
            await registry.check_all()
            assert registry.has_healthy_decoder()
            channel = registry.workers[0].channel
            await servicer.set("", NOT_SERVING)
            await registry.check_all()
            assert not registry.has_healthy_decoder()
            await servicer.set("", SERVING)
            await registry.check_all()
            assert registry.has_healthy_decoder()
            assert registry.workers[0].channel is channel  # reused, not reopened
            await server.stop(None)
            await registry.check_all()
            assert not registry.has_healthy_decoder()
        finally:
            await registry.close()
            await server.stop(None)

    asyncio.run(scenario())


def test_the_periodic_loop_notices_a_worker_coming_up() -> None:
    async def scenario() -> None:
        server, servicer, port = await health_server()
        await servicer.set("", NOT_SERVING)
        registry = WorkerRegistry(colocated=[f"127.0.0.1:{port}"], health_interval=0.05)
        try:
            registry.start()
            await servicer.set("", SERVING)
            for _ in range(100):
                if registry.healthy(DECODE):
                    break
                await asyncio.sleep(0.02)
            assert [w.role for w in registry.healthy(DECODE)] == [COLOCATED]
        finally:
            await registry.close()
            await server.stop(None)

    asyncio.run(scenario())


def test_pools_and_bad_addresses() -> None:
    registry = WorkerRegistry(prefill=["a:1"], decode=["b:2"], colocated=["c:3"])
    assert [w.address for w in registry.pool(PREFILL)] == ["a:1"]
    assert [w.address for w in registry.pool(DECODE)] == ["b:2", "c:3"]
    with pytest.raises(ValueError, match="HOST:PORT"):
        WorkerRegistry(decode=["nohost"])
    with pytest.raises(ValueError, match="twice"):
        WorkerRegistry(decode=["a:1"], colocated=["a:1"])
