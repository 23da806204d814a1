"""A worker's side of the Registry (workers/worker.py, `--router`): it registers once the
router answers (retrying while it is down, never raising), re-registers so a restarted router
learns it back, gives up on a refusal, and deregisters on leave() within a short deadline."""

from __future__ import annotations

import argparse
import asyncio
import time

import grpc
import pytest
from ports import free_port

from splitserve.v1 import pb, rpc
from splitserve.workers.worker import RouterRegistration, _check_router_flags


class FakeRegistry(rpc.RegistryServicer):
    def __init__(self, refuse: grpc.StatusCode | None = None) -> None:
        self.refuse = refuse
        self.registered: list[pb.RegisterRequest] = []
        self.deregistered: list[str] = []

    async def Register(self, request, context):
        self.registered.append(request)
        if self.refuse is not None:
            await context.abort(self.refuse, "refused by the test")
        return pb.RegisterResponse(added=len(self.registered) == 1, healthy=True)

    async def Deregister(self, request, context):
        self.deregistered.append(request.address)
        return pb.DeregisterResponse(found=True)


async def start_registry(servicer: FakeRegistry, port: int = 0) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    rpc.add_RegistryServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    assert port
    await server.start()
    return server, port


def membership(port: int, **kw: object) -> RouterRegistration:
    kw.setdefault("backoff_s", (0.05, 0.2))
    return RouterRegistration(f"127.0.0.1:{port}", "127.0.0.1:7000", "colocated", "m", "w-0", **kw)


async def wait_for(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_registers_once_the_router_comes_up_and_deregisters_on_leave() -> None:
    async def scenario() -> None:
        port = free_port()
        member = membership(port, refresh_s=0.1)
        member.start()
        await asyncio.sleep(0.4)  # the router is down: tries fail, nothing raises
        assert not member.registered.is_set() and member._task is not None
        assert not member._task.done()
        fake = FakeRegistry()
        server, _ = await start_registry(fake, port)
        try:
            await asyncio.wait_for(member.registered.wait(), 10)
            (first, *_) = fake.registered
            assert (first.address, first.role, first.model, first.worker_id) == (
                "127.0.0.1:7000",
                "colocated",
                "m",
                "w-0",
            )
            await wait_for(lambda: len(fake.registered) >= 3)  # refreshed, idempotently
            await member.leave()
            assert fake.deregistered == ["127.0.0.1:7000"]
            count = len(fake.registered)
            await asyncio.sleep(0.3)
            assert len(fake.registered) == count  # no registering after leaving
        finally:
            await member.close()
            await server.stop(None)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT]
)
def test_a_refusal_is_final(code: grpc.StatusCode) -> None:
    async def scenario() -> None:
        fake = FakeRegistry(refuse=code)
        server, port = await start_registry(fake)
        member = membership(port)
        try:
            member.start()
            assert member._task is not None
            await asyncio.wait_for(member._task, 10)  # ends by itself, without raising
            assert member.refused == code and len(fake.registered) == 1
            assert not member.registered.is_set()
        finally:
            await member.close()
            await server.stop(None)

    asyncio.run(scenario())


def test_leave_with_the_router_gone_is_bounded_and_quiet() -> None:
    async def scenario() -> None:
        member = membership(free_port())
        member.start()
        await asyncio.sleep(0.1)
        start = time.monotonic()
        await member.leave()  # logs, never raises
        assert time.monotonic() - start < 3.0
        await member.close()

    asyncio.run(scenario())


def args(**kw: object) -> argparse.Namespace:
    base = {"router": None, "advertise_address": None, "host": "127.0.0.1"}
    return argparse.Namespace(**{**base, **kw})


def test_router_flags_are_checked_at_startup() -> None:
    _check_router_flags(args())
    _check_router_flags(args(router="127.0.0.1:50051"))
    _check_router_flags(args(router="router:50051", host="0.0.0.0", advertise_address="w:1"))
    with pytest.raises(ValueError, match="HOST:PORT"):
        _check_router_flags(args(router="router"))
    with pytest.raises(ValueError, match="--advertise-address"):
        _check_router_flags(args(router="router:50051", host="0.0.0.0"))


def test_the_launcher_makes_every_worker_register_with_its_router() -> None:
    from splitserve.launcher import up
    from splitserve.launcher.topology import COMPOSE, LOCAL, Topology

    def flag(spec, name: str) -> list[str]:
        return [spec.args[i + 1] for i, a in enumerate(spec.args) if a == name]

    # The router's internal port (the Registry's own listener), never its public one.
    for placement, router in ((LOCAL, "127.0.0.1:50052"), (COMPOSE, "router:50052")):
        for argv in (["--prefill", "2", "--decode", "2"], ["--colocated", "--decode", "3"]):
            t = Topology.from_args(up.build_parser().parse_args(argv), placement)
            assert t.workers
            for w in t.workers:
                assert flag(w, "--router") == [router], w.name
                # What the router will dial: the worker's own name in compose, never 0.0.0.0.
                assert flag(w, "--advertise-address") == [
                    placement.address(w.name, w.ports["grpc"])
                ]
    t = Topology.from_args(up.build_parser().parse_args(["--no-register"]))
    assert all(flag(w, "--router") == [] for w in t.workers)


def test_a_router_that_is_late_is_news_and_one_that_stays_away_a_warning(monkeypatch, caplog):
    """`up` and compose start workers before their router: the first miss is INFO; a router
    still unreachable after REGISTER_WARN_AFTER_S gets one WARNING, not one per retry."""
    import logging

    from splitserve.workers import worker

    monkeypatch.setattr(worker, "REGISTER_WARN_AFTER_S", 0.3)

    async def scenario() -> None:
        member = membership(free_port())
        member.start()
        await asyncio.sleep(1.0)
        await member.close()

    with caplog.at_level(logging.DEBUG, logger="splitserve"):
        asyncio.run(scenario())
    misses = [r for r in caplog.records if "not reachable" in r.getMessage()]
    assert len(misses) >= 4
    assert misses[0].levelno == logging.INFO
    assert [r.levelno for r in misses].count(logging.WARNING) == 1
