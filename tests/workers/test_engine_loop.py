"""AsyncEngine: one engine thread, bounded admission, and every ending returns its blocks."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from workers_util import prompt, tiny_engine

from splitserve.engine.engine import CapacityError, LLMEngine
from splitserve.engine.outputs import RequestOutput
from splitserve.engine.sampling_params import SamplingParams
from splitserve.workers import engine_loop
from splitserve.workers.engine_loop import (
    AsyncEngine,
    DuplicateRequestError,
    EngineClosedError,
    QueueFullError,
    RequestFailedError,
    RequestStream,
)

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


async def started(engine: LLMEngine | None = None, **kwargs) -> AsyncEngine:
    aengine = AsyncEngine(engine or tiny_engine(), **kwargs)
    await aengine.start()
    return aengine


async def collect(stream: RequestStream) -> RequestOutput:
    result = RequestOutput.empty(stream.request_id)
    with stream:
        async for out in stream:
            result.merge(out)
    return result


def assert_idle(aengine: AsyncEngine) -> None:
    bm = aengine.engine.block_manager
    bm.check_integrity()
    assert bm.num_free_blocks == bm.num_blocks
    assert not aengine.engine.has_unfinished_requests()
    assert aengine.engine.num_reserved_requests == 0
    assert aengine.num_live_requests == 0


async def settle(aengine: AsyncEngine) -> None:
    """Wait until every queued command (aborts from closed streams included) has run."""
    await aengine.call(lambda e: None)


def block_engine_thread(aengine: AsyncEngine) -> threading.Event:
    """Park the engine thread on an event, so the test controls when it runs again."""
    release = threading.Event()
    aengine._commands.put(lambda: release.wait(10))
    return release


@pytest.mark.asyncio
async def test_outputs_match_the_synchronous_engine():
    expected = [o.new_token_ids for o in tiny_engine().generate([prompt(9), prompt(5, 3)], GREEDY)]
    aengine = await started()
    streams = [
        await aengine.add_request("a", prompt(9), GREEDY),
        await aengine.add_request("b", prompt(5, 3), GREEDY),
    ]
    results = await asyncio.gather(*(collect(s) for s in streams))
    assert [r.new_token_ids for r in results] == expected
    assert all(r.finish_reason == "length" for r in results)
    assert aengine.load.num_running == 0 and aengine.load.num_free_blocks == 32
    assert_idle(aengine)
    await aengine.shutdown()


@pytest.mark.asyncio
async def test_idle_thread_sleeps():
    aengine = await started()
    await collect(await aengine.add_request("a", prompt(5), GREEDY))
    steps = aengine.engine.stats.num_steps
    cpu = time.process_time()
    await asyncio.sleep(0.3)
    assert aengine.engine.stats.num_steps == steps
    assert time.process_time() - cpu < 0.1  # a spinning thread would burn the whole 0.3 s
    await aengine.shutdown()


@pytest.mark.asyncio
async def test_heap_is_trimmed_once_after_a_burst_never_while_busy(monkeypatch):
    trims: list[int] = []  # the engine's step count at each trim
    aengine = await started()
    monkeypatch.setattr(engine_loop, "IDLE_TRIM_S", 0.2)
    monkeypatch.setattr(
        engine_loop.heap, "trim", lambda: trims.append(aengine.engine.stats.num_steps)
    )
    await asyncio.sleep(0.4)
    assert trims == []  # nothing ran since start: nothing to give back
    await collect(await aengine.add_request("a", prompt(5), SamplingParams(max_tokens=40)))
    steps = aengine.engine.stats.num_steps
    assert trims == []  # not between the steps of a request
    await asyncio.sleep(0.6)
    assert trims == [steps]  # once, after the burst, and not again while idle
    await aengine.call(lambda e: None)  # a command alone is no burst
    await asyncio.sleep(0.4)
    assert trims == [steps]
    await aengine.shutdown()


@pytest.mark.asyncio
async def test_admission_is_bounded_by_requests_and_tokens():
    aengine = await started(max_waiting_requests=2, max_queued_tokens=30)
    release = block_engine_thread(aengine)
    first = [asyncio.create_task(aengine.add_request(f"r{i}", prompt(8), GREEDY)) for i in (0, 1)]
    await asyncio.sleep(0)  # both are admitted and counted before the engine thread runs
    with pytest.raises(QueueFullError):
        await aengine.add_request("r2", prompt(8), GREEDY)
    release.set()
    streams = await asyncio.gather(*first)
    await asyncio.gather(*(collect(s) for s in streams))

    release = block_engine_thread(aengine)
    task = asyncio.create_task(aengine.add_request("t0", prompt(25), GREEDY))
    await asyncio.sleep(0)
    with pytest.raises(QueueFullError):  # 25 + 8 tokens > 30
        await aengine.add_request("t1", prompt(8), GREEDY)
    release.set()
    await collect(await task)
    assert_idle(aengine)
    await aengine.shutdown()


@pytest.mark.asyncio
async def test_duplicate_live_id_is_rejected():
    aengine = await started()
    stream = await aengine.add_request("dup", prompt(5), SamplingParams(max_tokens=30))
    with pytest.raises(DuplicateRequestError):
        await aengine.add_request("dup", prompt(5), GREEDY)
    await collect(stream)
    await collect(await aengine.add_request("dup", prompt(5), GREEDY))  # free again once done
    assert_idle(aengine)
    await aengine.shutdown()


@pytest.mark.asyncio
async def test_consumer_walking_away_returns_blocks():
    aengine = await started()
    long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    stream = await aengine.add_request("gone", prompt(20), long)
    await stream.next()
    stream.close()
    # and a task cancelled while it waits for tokens (a client cancelling its RPC)
    stream2 = await aengine.add_request("cancelled", prompt(20), long)
    task = asyncio.create_task(collect(stream2))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await settle(aengine)
    assert_idle(aengine)
    await aengine.shutdown()


@pytest.mark.asyncio
async def test_abort_ends_the_stream_with_abort():
    aengine = await started()
    stream = await aengine.add_request("x", prompt(20), SamplingParams(max_tokens=200))
    await stream.next()
    assert await aengine.abort("x")
    outs = [out async for out in stream]
    assert outs[-1].finished and outs[-1].finish_reason == "abort"
    assert not await aengine.abort("x")
    assert_idle(aengine)
    await aengine.shutdown()


@pytest.mark.asyncio
async def test_failing_step_fails_running_requests_and_keeps_serving():
    engine = tiny_engine()
    aengine = await started(engine)
    execute = engine.runner.execute
    calls = {"n": 0}

    def flaky(inputs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("kernel exploded")
        return execute(inputs)

    engine.runner.execute = flaky
    stream = await aengine.add_request("doomed", prompt(6), SamplingParams(max_tokens=50))
    with pytest.raises(RequestFailedError, match="kernel exploded"):
        await collect(stream)
    assert_idle(aengine)
    ok = await collect(await aengine.add_request("fine", prompt(6), GREEDY))
    assert len(ok.new_token_ids) == 8
    assert_idle(aengine)
    await aengine.shutdown()


@pytest.mark.asyncio
async def test_drain_waits_for_in_flight_then_rejects_new():
    aengine = await started()
    stream = await aengine.add_request("inflight", prompt(6), GREEDY)
    consumer = asyncio.create_task(collect(stream))
    assert await aengine.drain(timeout=30)
    assert consumer.done() and len(consumer.result().new_token_ids) == 8
    with pytest.raises(EngineClosedError):
        await aengine.add_request("late", prompt(6), GREEDY)
    await aengine.shutdown()
    assert_idle(aengine)


@pytest.mark.asyncio
async def test_shutdown_fails_live_requests_and_returns_blocks():
    aengine = await started()
    stream = await aengine.add_request("live", prompt(6), SamplingParams(max_tokens=500))
    reserved = await aengine.reserve_prefilled("held", prompt(9), GREEDY)
    await stream.next()
    await aengine.shutdown()
    with pytest.raises(EngineClosedError):
        await collect(stream)
    with pytest.raises(EngineClosedError):
        await reserved.next()
    assert_idle(aengine)


@pytest.mark.asyncio
async def test_reserve_complete_and_cancel():
    engine = tiny_engine()
    p = prompt(10)
    expected = engine.generate([p], GREEDY)[0].new_token_ids
    engine.add_request("pre", p, SamplingParams(max_tokens=1, temperature=0), export_kv=True)
    kv = next(o for _ in range(10) for o in engine.step() if o.finished).kv
    aengine = await started(engine)

    held = await aengine.reserve_prefilled("c", p, GREEDY)
    assert aengine.load.num_free_blocks < 32 or engine.block_manager.num_free_blocks < 32
    held.close()
    await settle(aengine)
    assert_idle(aengine)

    stream = await aengine.reserve_prefilled("d", p, GREEDY)
    assert await aengine.complete_prefilled(stream, kv, expected[0])
    assert (await collect(stream)).new_token_ids == expected
    assert_idle(aengine)
    await aengine.shutdown()


@pytest.mark.asyncio
async def test_reservation_beyond_the_pool_is_capacity_error():
    aengine = await started(tiny_engine(num_blocks=8))
    held = await aengine.reserve_prefilled("big", prompt(24), GREEDY)  # 6 of 8 blocks
    with pytest.raises(CapacityError):
        await aengine.reserve_prefilled("more", prompt(12), GREEDY)
    # a request that must wait for those blocks neither spins nor fails: it runs once they're back
    waiting = await aengine.add_request("waits", prompt(12), GREEDY)
    await asyncio.sleep(0.1)
    assert aengine.engine.stats.num_steps == 0
    held.close()
    assert len((await collect(waiting)).new_token_ids) == 8
    assert_idle(aengine)
    await aengine.shutdown()


@pytest.mark.asyncio
async def test_load_builds_steps_and_closes_on_one_thread():
    """The thread that loads the engine is the one that steps and closes it (OpenMP runs
    slower on a thread other than the one that first used it)."""
    seen: dict[str, int] = {}

    def factory() -> LLMEngine:
        seen["load"] = threading.get_ident()
        engine = tiny_engine()
        close = engine.close

        def recording_close() -> None:
            seen["close"] = threading.get_ident()
            close()

        engine.close = recording_close  # type: ignore[method-assign]
        return engine

    aengine = await AsyncEngine.load(factory)
    await aengine.start()
    seen["step"] = await aengine.call(lambda e: threading.get_ident())
    out = await collect(await aengine.add_request("r", prompt(5), GREEDY))
    assert len(out.new_token_ids) == 8
    await aengine.shutdown()
    assert seen["load"] == seen["step"] == seen["close"] != threading.get_ident()


@pytest.mark.asyncio
async def test_load_failure_is_raised_and_leaves_no_thread():
    # the threads alive before, not their count: a thread an earlier test left may end meanwhile
    before = set(threading.enumerate())

    def broken() -> LLMEngine:
        raise ValueError("no such model")

    with pytest.raises(ValueError, match="no such model"):
        await AsyncEngine.load(broken)
    for _ in range(100):  # the thread ends on its own once told to stop
        if not set(threading.enumerate()) - before:
            break
        await asyncio.sleep(0.01)
    assert not set(threading.enumerate()) - before


@pytest.mark.asyncio
async def test_a_lost_rank_fails_requests_and_reports_broken_once():
    from splitserve.executors.tensor_parallel import ShardGroupError

    engine = tiny_engine()
    calls: list[BaseException] = []
    aengine = await started(engine, on_broken=calls.append)

    def dead_step():
        engine.runner.executor.broken = "rank 1 exited"  # what a TP executor records
        raise ShardGroupError("rank 1 exited")

    engine.step = dead_step  # type: ignore[method-assign]
    for i in range(2):
        stream = await aengine.add_request(f"r{i}", prompt(5), GREEDY)
        with pytest.raises(ShardGroupError):
            await collect(stream)
    await settle(aengine)
    assert len(calls) == 1 and "rank 1 exited" in str(calls[0])
    assert aengine.broken is calls[0]
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks  # the failed requests gave their blocks back
    await aengine.shutdown()


@pytest.mark.asyncio
async def test_a_stage_that_may_answer_again_is_not_reported_broken():
    """An unreachable stage the executor hasn't given up on fails the step, not the worker."""
    from splitserve.executors.pipeline.executor import StageUnavailableError

    engine = tiny_engine()
    calls: list[BaseException] = []
    aengine = await started(engine, on_broken=calls.append)
    real_step = engine.step

    def unreachable_step():
        raise StageUnavailableError("stage 1 unreachable")  # executor.broken stays None

    engine.step = unreachable_step  # type: ignore[method-assign]
    with pytest.raises(StageUnavailableError):
        await collect(await aengine.add_request("r", prompt(5), GREEDY))
    await settle(aengine)
    assert calls == [] and aengine.broken is None
    engine.step = real_step  # type: ignore[method-assign]
    out = await collect(await aengine.add_request("r2", prompt(5), GREEDY))
    assert len(out.new_token_ids) == 8  # and it serves again
    await aengine.shutdown()
