"""The dispatcher moving requests off failed workers, against real worker servicers in this
process (tiny random engines, real gRPC): a decode worker that dies mid-stream, one that hangs,
a prefill worker that dies before handing over its KV. The client's tokens must be exactly the
uninterrupted run's, greedy and seeded, and every worker and load counter must end idle."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from contextlib import aclosing

import pytest
from workers_util import prompt, running, serve_decode, serve_prefill, tiny_engine

from splitserve.engine.hashing import kv_namespace
from splitserve.engine.sampling_params import SamplingParams
from splitserve.router.dispatch import (
    CallSlot,
    DispatchConfig,
    Dispatcher,
    DispatchHooks,
    WorkerTokens,
)
from splitserve.router.policy import Policy
from splitserve.router.registry import Worker, WorkerRegistry
from splitserve.router.validation import ValidatedRequest
from splitserve.v1 import pb

P = prompt(22)
N = 24
GREEDY = SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=N, temperature=1.0, top_k=40, seed=1234, ignore_eos=True)
CASES = {"greedy": GREEDY, "seeded": SEEDED}


class Prefer(Policy):
    """The first listed address that is offered: which worker fails is the test's choice."""

    name = "prefer"

    def __init__(self, *addresses: str) -> None:
        super().__init__()
        self.addresses = addresses

    def _select(self, workers: Sequence[Worker], job) -> Worker:
        for address in self.addresses:
            for w in workers:
                if w.address == address:
                    return w
        return workers[0]


def reference(params: SamplingParams) -> list[int]:
    return tiny_engine().generate([P], params)[0].new_token_ids


def dispatcher_for(
    decode: Sequence[str], prefill: Sequence[str] = (), **config
) -> tuple[Dispatcher, WorkerRegistry, list[tuple[str, str]]]:
    registry = WorkerRegistry(prefill=prefill, colocated=decode)
    for w in registry.workers:
        w.healthy = True  # these servers have no health service; the tests decide who fails
    migrations: list[tuple[str, str]] = []
    hooks = DispatchHooks(on_migrate=lambda phase, reason: migrations.append((phase, reason)))
    # The tiny engine's namespace: its model id is "tiny", fp32, blocks of 4.
    cfg = DispatchConfig(kv_namespace("tiny", "float32", 4), block_size=4, **config)
    policy = Prefer(*decode, *prefill)
    return Dispatcher(registry, policy, cfg, hooks=hooks), registry, migrations


def request(params: SamplingParams, disaggregate: bool | None = False) -> ValidatedRequest:
    return ValidatedRequest("mig-1", list(P), params, None, disaggregate)


async def run_until(dispatcher: Dispatcher, req: ValidatedRequest, after: int, fault) -> list:
    """Stream the request; once `after` tokens have arrived, inject `fault()` (awaited)."""
    events: list[WorkerTokens] = []
    count = 0
    async with aclosing(dispatcher.stream(req, CallSlot())) as stream:
        async for ev in stream:
            events.append(ev)
            count += len(ev.token_ids)
            if fault is not None and count >= after:
                await fault()
                fault = None
    return events


def relayed(events: list[WorkerTokens]) -> list[int]:
    return [t for ev in events for t in ev.token_ids]


async def wait_idle(*served, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    for s in served:
        bm = s.worker.engine.engine.block_manager
        while bm.num_free_blocks != bm.num_blocks or s.worker.engine.num_live_requests:
            assert time.monotonic() < deadline, f"{s.address} still holds blocks"
            await asyncio.sleep(0.05)


def idle(registry: WorkerRegistry) -> bool:
    return all(w.load.tokens == 0 and w.load.requests == 0 for w in registry.workers)


@pytest.mark.asyncio
@pytest.mark.parametrize("case", CASES)
async def test_a_decode_worker_dying_mid_stream_loses_nothing(case):
    params = CASES[case]
    expected = reference(params)
    async with (
        running(serve_decode(tiny_engine(), role="colocated")) as a,
        running(serve_decode(tiny_engine(), role="colocated")) as b,
    ):
        dispatcher, registry, migrations = dispatcher_for([a.address, b.address])

        async def kill_a() -> None:
            await a.server.stop(grace=None)  # its calls end at once, as a dead process's do

        events = await run_until(dispatcher, request(params), 5, kill_a)
        assert relayed(events) == expected  # no gap, no duplicate, same draws
        assert events[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert migrations == [("mid_stream", "unavailable")]
        assert not registry.get(a.address).healthy and registry.get(b.address).healthy
        await wait_idle(a, b)
        assert idle(registry)
        # Counted as the worker's stream closes, a moment after the client got its last token.
        for _ in range(100):
            if b.worker.metrics.value("requests_total", outcome="length") == 1:
                break
            await asyncio.sleep(0.05)
        assert b.worker.metrics.value("requests_total", outcome="length") == 1


@pytest.mark.asyncio
async def test_a_hung_decode_worker_is_left_after_the_idle_timeout():
    expected = reference(SEEDED)
    async with (
        running(serve_decode(tiny_engine(), role="colocated")) as a,
        running(serve_decode(tiny_engine(), role="colocated")) as b,
    ):
        dispatcher, registry, migrations = dispatcher_for(
            [a.address, b.address], stream_idle_timeout_s=0.5
        )
        stalls: list[asyncio.Future] = []

        async def hang_a() -> None:  # its engine thread stops stepping, as a stopped process
            stalls.append(asyncio.ensure_future(a.worker.engine.call(lambda e: time.sleep(3))))

        events = await run_until(dispatcher, request(SEEDED), 3, hang_a)
        assert relayed(events) == expected
        assert migrations == [("mid_stream", "idle_timeout")]
        await stalls[0]
        await wait_idle(a, b)  # `a` got the cancellation and freed the request's blocks
        assert idle(registry)


@pytest.mark.asyncio
async def test_a_decode_worker_dying_before_its_first_token_is_retried_from_scratch():
    expected = reference(GREEDY)
    async with (
        running(serve_decode(tiny_engine(), role="colocated")) as a,
        running(serve_decode(tiny_engine(), role="colocated")) as b,
    ):
        dispatcher, registry, migrations = dispatcher_for([a.address, b.address])
        stalled = asyncio.ensure_future(a.worker.engine.call(lambda e: time.sleep(1.0)))
        task = asyncio.ensure_future(run_until(dispatcher, request(GREEDY), 0, None))
        await asyncio.sleep(0.3)  # the request is on `a`, queued behind the stall
        await a.server.stop(grace=None)
        events = await task
        assert relayed(events) == expected
        assert migrations == [("before_first_token", "unavailable")]
        await stalled
        await wait_idle(a, b)
        assert idle(registry)


@pytest.mark.asyncio
async def test_a_prefill_worker_dying_before_handing_over_its_kv():
    expected = reference(GREEDY)
    async with (
        running(serve_prefill(tiny_engine())) as pre,
        running(serve_decode(tiny_engine())) as dec,
    ):
        dispatcher, registry, migrations = dispatcher_for([dec.address], [pre.address])
        stalled = asyncio.ensure_future(pre.worker.engine.call(lambda e: time.sleep(1.0)))
        task = asyncio.ensure_future(
            run_until(dispatcher, request(GREEDY, disaggregate=True), 0, None)
        )
        await asyncio.sleep(0.3)  # the prefill is queued behind the stall
        await pre.server.stop(grace=None)
        events = await task
        assert relayed(events) == expected  # the decode worker prefilled it instead
        assert migrations == [("prefill", "unavailable")]
        assert not registry.get(pre.address).healthy
        await stalled
        await wait_idle(pre, dec)
        assert len(pre.servicer.leases) == 0 and idle(registry)
