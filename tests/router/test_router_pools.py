"""Dynamic pools (data parallelism): workers added and removed at runtime, registered workers
dropped after failing health checks while listed ones stay, requests already on a removed
worker left alone, and splitserve.v1.Registry on a real grpc.aio server with its status codes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import partial

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from router_testing import serve_router

from splitserve.model.loader import Checkpoint
from splitserve.router.app import Router, RouterConfig
from splitserve.router.registry import COLOCATED, DECODE, PREFILL, WorkerRegistry
from splitserve.router.registry_api import RegistryServicer
from splitserve.v1 import pb, rpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health_server() -> tuple[grpc.aio.Server, health.aio.HealthServicer, str]:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await servicer.set("", SERVING)
    return server, servicer, f"127.0.0.1:{port}"


def dead_address() -> str:
    """A loopback port nobody listens on: connections are refused at once."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


# ---- add / remove ----------------------------------------------------------------------------
def test_add_is_idempotent_and_joins_the_right_pool() -> None:
    registry = WorkerRegistry(decode=["d:1"])
    worker, added = registry.add("c:2", COLOCATED)
    assert added and not worker.static and not worker.healthy  # no traffic before a check
    again, added_again = registry.add("c:2", COLOCATED)
    assert again is worker and not added_again
    assert [w.address for w in registry.pool(DECODE)] == ["d:1", "c:2"]
    assert registry.pool(PREFILL) == []
    p, _ = registry.add("p:3", PREFILL)
    assert registry.pool(PREFILL) == [p]
    assert registry.events == {"added": 2, "removed": 0, "dropped": 0}


def test_add_rejects_bad_addresses_and_roles() -> None:
    registry = WorkerRegistry()
    for address in ("nohost", ":50", "h:", "h:port", "h:0", "h:70000"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            registry.add(address, DECODE)
    with pytest.raises(ValueError, match="role"):
        registry.add("h:1", "stage")
    assert registry.workers == []


def test_same_address_with_another_role_replaces_the_entry() -> None:
    registry = WorkerRegistry(decode=["w:1"])
    old = registry.workers[0]
    new, added = registry.add("w:1", COLOCATED)
    assert added and new is not old and old.removed
    assert registry.workers == [new] and new.role == COLOCATED
    assert new.static  # the command line listed this address: it stays protected


def test_remove_takes_a_worker_out_of_selection() -> None:
    registry = WorkerRegistry(decode=["d:1"], colocated=["c:2"])
    for w in registry.workers:
        w.healthy = True
    assert registry.remove("c:2")
    assert [w.address for w in registry.healthy(DECODE)] == ["d:1"]
    assert not registry.remove("c:2") and not registry.remove("x:9")
    assert registry.get("c:2") is None
    assert registry.events["removed"] == 1


def test_deregister_removes_registered_workers_and_benches_listed_ones() -> None:
    registry = WorkerRegistry(decode=["listed:1"])
    registry.add("joined:2", DECODE)
    for w in registry.workers:
        w.healthy = True
    assert registry.deregister("joined:2") and registry.get("joined:2") is None
    assert registry.deregister("listed:1")
    listed = registry.get("listed:1")
    assert listed is not None and not listed.healthy  # kept: a restart brings it back
    assert not registry.deregister("unknown:3")


def test_a_request_on_a_removed_worker_keeps_its_channel_until_it_ends() -> None:
    async def scenario() -> None:
        registry = WorkerRegistry()
        worker, _ = registry.add("127.0.0.1:9", DECODE)
        channel = worker.channel  # a request is using it
        ticket = worker.track(100)
        registry.remove(worker.address)
        await asyncio.sleep(0.01)
        assert worker._channel is channel  # not closed under the running request
        assert worker.load.requests == 1
        ticket.consume(10)
        ticket.release()  # the request ends normally
        for _ in range(100):
            if worker._channel is None:
                break
            await asyncio.sleep(0.01)
        assert worker._channel is None and worker.load.requests == worker.load.tokens == 0
        await registry.close()

    asyncio.run(scenario())


def test_an_idle_removed_worker_is_closed_at_once() -> None:
    async def scenario() -> None:
        registry = WorkerRegistry()
        worker, _ = registry.add("127.0.0.1:9", DECODE)
        _ = worker.channel
        registry.remove(worker.address)
        await asyncio.sleep(0.05)
        assert worker._channel is None
        await registry.close()

    asyncio.run(scenario())


# ---- health: drop registered workers, keep listed ones ---------------------------------------
def test_a_registered_worker_failing_checks_is_dropped_a_listed_one_stays() -> None:
    async def scenario() -> None:
        listed, joined = dead_address(), dead_address()
        registry = WorkerRegistry(decode=[listed], health_timeout=0.5, drop_after_failures=3)
        registry.add(joined, COLOCATED)
        try:
            for _ in range(2):
                await registry.check_all()
            assert registry.get(joined) is not None  # two failures: not yet
            assert registry.get(joined).failures == 2
            await registry.check_all()
            assert registry.get(joined) is None
            assert registry.events["dropped"] == 1
            for _ in range(3):
                await registry.check_all()
            assert registry.get(listed) is not None and registry.get(listed).failures == 6
        finally:
            await registry.close()

    asyncio.run(scenario())


def test_a_passing_check_resets_the_failure_count() -> None:
    async def scenario() -> None:
        server, servicer, address = await health_server()
        registry = WorkerRegistry(health_timeout=0.5, drop_after_failures=2)
        registry.add(address, DECODE)
        try:
            await servicer.set("", NOT_SERVING)
            await registry.check_all()
            assert registry.get(address).failures == 1
            await servicer.set("", SERVING)
            await registry.check_all()
            assert registry.get(address).failures == 0 and registry.has_healthy_decoder()
            await servicer.set("", NOT_SERVING)
            await registry.check_all()
            assert registry.get(address) is not None  # 1 failure after the reset, not 2
            await registry.check_all()
            assert registry.get(address) is None
        finally:
            await registry.close()
            await server.stop(None)

    asyncio.run(scenario())


def test_register_checks_health_right_away() -> None:
    async def scenario() -> None:
        server, _, address = await health_server()
        registry = WorkerRegistry(health_interval=3600)  # no periodic round would help
        try:
            worker, added = await registry.register(address, COLOCATED)
            assert added and worker.healthy and registry.healthy(DECODE) == [worker]
            dead, _ = await registry.register(dead_address(), DECODE)
            assert not dead.healthy and dead.failures == 1
        finally:
            await registry.close()
            await server.stop(None)

    asyncio.run(scenario())


def test_metrics_count_pool_changes(smollm2_checkpoint: Checkpoint) -> None:
    router = Router(RouterConfig(decode=("127.0.0.1:9",)), smollm2_checkpoint)
    router.workers.add("127.0.0.1:10", COLOCATED)
    router.workers.remove("127.0.0.1:9")
    body = router.metrics.render().decode()
    assert 'splitserve_router_worker_pool_changes_total{event="added"} 1.0' in body
    assert 'splitserve_router_worker_pool_changes_total{event="removed"} 1.0' in body
    assert 'worker="127.0.0.1:10"' in body and 'worker="127.0.0.1:9"' not in body


# ---- the Registry service ----------------------------------------------------------------------
Scenario = Callable[[Router, rpc.RegistryStub], Awaitable[None]]


def serve_registry(checkpoint: Checkpoint, scenario: Scenario, **config: object) -> Router:
    router = Router(RouterConfig(**config), checkpoint)
    add = partial(rpc.add_RegistryServicer_to_server, RegistryServicer(router))
    return serve_router(router, add, rpc.RegistryStub, scenario)


async def register_code(stub: rpc.RegistryStub, **fields: str) -> grpc.StatusCode:
    try:
        await stub.Register(pb.RegisterRequest(**fields), timeout=10)
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_register_and_deregister_over_grpc(smollm2_checkpoint: Checkpoint) -> None:
    model = smollm2_checkpoint.config.name

    async def scenario(router: Router, stub: rpc.RegistryStub) -> None:
        server, _, address = await health_server()
        try:
            req = pb.RegisterRequest(address=address, role="colocated", model=model, worker_id="w")
            reply = await stub.Register(req, timeout=10)
            assert reply.added and reply.healthy
            assert [w.address for w in router.workers.healthy(DECODE)] == [address]
            again = await stub.Register(req, timeout=10)
            assert not again.added and again.healthy and len(router.workers.workers) == 1
            gone = await stub.Deregister(pb.DeregisterRequest(address=address), timeout=10)
            assert gone.found and router.workers.workers == []
            gone = await stub.Deregister(pb.DeregisterRequest(address=address), timeout=10)
            assert not gone.found
        finally:
            await server.stop(None)

    serve_registry(smollm2_checkpoint, scenario)


def test_register_status_codes(smollm2_checkpoint: Checkpoint) -> None:
    model = smollm2_checkpoint.config.name
    invalid, precondition = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION

    async def scenario(router: Router, stub: rpc.RegistryStub) -> None:
        cases = [
            ({"address": "no-port", "role": "decode", "model": model}, invalid),
            ({"address": "h:1", "role": "pipeline", "model": model}, invalid),
            ({"address": "h:1", "role": "", "model": model}, invalid),
            ({"address": "h:" + "1" * 300, "role": "decode", "model": model}, invalid),
            ({"address": "h:1", "role": "decode", "model": "llama-3-70b"}, precondition),
            ({"address": "h:1", "role": "decode", "model": ""}, precondition),
        ]
        for fields, code in cases:
            assert await register_code(stub, **fields) == code, fields
        assert router.workers.workers == []  # nothing half-added
        # The served name may differ from the checkpoint's: both are the router's model.
        assert await register_code(stub, address=dead_address(), role="prefill", model=model) == (
            grpc.StatusCode.OK
        )
        assert len(router.workers.pool(PREFILL)) == 1
        await router.drain(timeout_s=0.1)
        assert await register_code(stub, address="h:2", role="decode", model=model) == (
            grpc.StatusCode.UNAVAILABLE
        )

    serve_registry(smollm2_checkpoint, scenario, served_model_name="my-model")
