"""Dispatcher unit tests, with scripted worker stubs in place of channels: the disaggregation
decision, prefill retries and the local fallback, the KV handoff, lease release, abort,
migration (a worker that fails or hangs mid-stream, resumed elsewhere from the tokens sent, at
most max_migrations times), admission control (per-worker limits, the bounded queue, 429),
deadlines and interruptions, and load counters back at zero on every exit (finish, error,
caller gone). tests/router/test_router_migration.py does the same against real workers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import grpc
import pytest

from splitserve.engine.hashing import kv_namespace
from splitserve.engine.sampling_params import SamplingParams
from splitserve.router.admission import (
    AdmissionConfig,
    Deadline,
    DeadlineExceededError,
    QueueFullError,
    reported_limit,
)
from splitserve.router.dispatch import CallSlot, DispatchConfig, Dispatcher, WorkerTokens
from splitserve.router.errors import UnavailableError, UpstreamError
from splitserve.router.policy import LeastOutstandingTokens, Policy, RoundRobin
from splitserve.router.registry import WorkerRegistry
from splitserve.router.validation import ValidatedRequest
from splitserve.v1 import pb, rpc

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "scripted")


HANG = object()  # a FakeUnary result: never answers until cancelled


class FakeUnary:
    """An awaitable call with cancel(), like grpc.aio's UnaryUnaryCall."""

    def __init__(self, result: Any) -> None:
        self.result = result
        self.cancelled = asyncio.Event()

    def __await__(self) -> Any:
        yield from asyncio.sleep(0).__await__()
        if self.result is HANG:
            yield from self.cancelled.wait().__await__()
            raise asyncio.CancelledError
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result

    def cancel(self) -> bool:
        self.cancelled.set()
        return True


class FakeStream:
    """A server stream: scripted responses, then an error or an end; `hang` waits for cancel;
    `first_delay_s` before the first response (a long prefill)."""

    def __init__(
        self,
        responses: list[pb.DecodeResponse],
        error: Exception | None,
        hang: bool,
        first_delay_s: float = 0.0,
    ):
        self.responses, self.error, self.hang = responses, error, hang
        self.first_delay_s = first_delay_s
        self.cancelled = asyncio.Event()

    def cancel(self) -> bool:
        self.cancelled.set()
        return True

    def __aiter__(self) -> AsyncIterator[pb.DecodeResponse]:
        return self._run()

    async def _run(self) -> AsyncIterator[pb.DecodeResponse]:
        await asyncio.sleep(self.first_delay_s)
        for r in self.responses:
            await asyncio.sleep(0)
            if self.cancelled.is_set():
                raise asyncio.CancelledError
            yield r
        if self.hang:
            await self.cancelled.wait()
            raise asyncio.CancelledError
        if self.error is not None:
            raise self.error


class FakePrefill:
    def __init__(self, result: Any) -> None:
        self.result = result
        self.requests: list[pb.PrefillRequest] = []
        self.released: list[str] = []

    def Prefill(self, request: pb.PrefillRequest, **kw: Any) -> FakeUnary:
        self.requests.append(request)
        return FakeUnary(self.result)

    def ReleaseKV(self, request: pb.ReleaseKVRequest, **kw: Any) -> FakeUnary:
        self.released.append(request.lease_id)
        return FakeUnary(pb.ReleaseKVResponse(released=True))


class FakeDecode:
    def __init__(
        self,
        responses=(),
        error: Exception | None = None,
        hang: bool = False,
        first_delay_s: float = 0.0,
    ) -> None:
        self.script = (list(responses), error, hang, first_delay_s)
        self.requests: list[pb.DecodeRequest] = []
        self.calls: list[FakeStream] = []

    def Generate(self, request: pb.DecodeRequest, **kw: Any) -> FakeStream:
        self.requests.append(request)
        self.calls.append(FakeStream(*self.script))
        return self.calls[-1]


def tokens(*ids: int, finish: int = 0) -> pb.DecodeResponse:
    return pb.DecodeResponse(token_ids=ids, finish_reason=finish)


DONE = [tokens(7), tokens(8, 9, finish=pb.FINISH_REASON_LENGTH)]
RESUMED = [tokens(8, 9, finish=pb.FINISH_REASON_LENGTH)]  # what a worker resuming after 7 sends


def setup(
    prefill: list[FakePrefill],
    decode: list[FakeDecode],
    policy: Policy | None = None,
    **config: Any,
) -> tuple[Dispatcher, WorkerRegistry]:
    registry = WorkerRegistry(
        prefill=[f"p{i}:1" for i in range(len(prefill))],
        decode=[f"d{i}:1" for i in range(len(decode))],
    )
    for worker, stub in zip(registry.workers, [*prefill, *decode], strict=True):
        worker.healthy = True
        kind = rpc.PrefillStub if isinstance(stub, FakePrefill) else rpc.DecodeStub
        worker._stubs[kind] = stub  # scripted instead of a channel
    cfg = DispatchConfig(kv_namespace("m", "float32", 16), disagg_min_tokens=256, **config)
    return Dispatcher(registry, policy or RoundRobin(), cfg), registry


def request(num_tokens: int, disaggregate: bool | None = None) -> ValidatedRequest:
    ids = list(range(1, num_tokens + 1))
    return ValidatedRequest("r1", ids, SamplingParams(max_tokens=3), None, disaggregate)


def first_token(finished: bool = False) -> pb.PrefillResponse:
    response = pb.PrefillResponse(first_token_id=7, num_cached_tokens=32, finished=finished)
    if finished:
        response.finish_reason = pb.FINISH_REASON_STOP
    else:
        response.kv.CopyFrom(pb.KVHandle(prefill_address="p0:1", lease_id="L1", num_tokens=512))
    return response


async def collect(dispatcher: Dispatcher, req: ValidatedRequest) -> list[WorkerTokens]:
    async with aclosing(dispatcher.stream(req, CallSlot())) as events:
        return [ev async for ev in events]


def idle(registry: WorkerRegistry) -> bool:
    return all(w.load.tokens == 0 and w.load.requests == 0 for w in registry.workers)


def test_disaggregation_decision() -> None:
    dispatcher, registry = setup([FakePrefill(None)], [FakeDecode()])
    plan = lambda n, d=None: dispatcher.plan(request(n, d), dispatcher.job(request(n, d)))  # noqa: E731
    assert (plan(100).mode, plan(100).reason) == ("local", "short_prompt")
    assert (plan(512).mode, plan(512).reason) == ("disaggregated", "long_prompt")
    assert (plan(100, True).mode, plan(512, False).mode) == ("disaggregated", "local")
    # The decode worker already holds most of the prompt: what is left is short.
    registry.workers[1].prefixes.insert(dispatcher.job(request(512)).block_hashes)
    assert plan(520).reason == "short_prompt"
    registry.workers[1].prefixes.clear()
    registry.workers[0].load.tokens = 10**6
    assert (plan(512).mode, plan(512).reason) == ("local", "prefill_backed_up")
    registry.workers[0].healthy = False
    assert plan(512).reason == "no_prefill_workers"
    with pytest.raises(UnavailableError):
        plan(512, True)
    registry.workers[1].healthy = False
    with pytest.raises(UnavailableError):
        plan(10)


def withheld(*ids: int, finish: int = 0) -> pb.DecodeResponse:
    """A decode worker's first message for a hand-off whose first token the router sent."""
    return pb.DecodeResponse(token_ids=ids, finish_reason=finish, first_token_withheld=True)


HANDED_OFF = [withheld(), tokens(8, 9, finish=pb.FINISH_REASON_LENGTH)]


def test_disaggregated_request_sends_prefills_token_before_the_hand_off() -> None:
    prefill, decode = FakePrefill(first_token()), FakeDecode(HANDED_OFF)
    dispatcher, registry = setup([prefill], [decode])

    async def scenario() -> list[WorkerTokens]:
        async with aclosing(dispatcher.stream(request(512), CallSlot())) as events:
            first = await anext(events)
            assert decode.requests == []  # out before the decode worker was even called
            return [first] + [ev async for ev in events]

    events = asyncio.run(scenario())
    assert [ev.token_ids for ev in events] == [[7], [8, 9]]  # the empty message is not relayed
    sent = decode.requests[0]
    assert sent.kv.lease_id == "L1" and sent.first_token_id == 7 and sent.first_token_sent
    assert all(ev.num_cached_tokens == 32 for ev in events)  # the prefill worker's cache hit
    assert prefill.released == [] and idle(registry)


def test_a_decode_worker_that_predates_first_token_sent_has_its_copy_dropped() -> None:
    # It streams the first token again (DONE starts with 7) and does not say it withheld it.
    prefill, decode = FakePrefill(first_token()), FakeDecode(DONE)
    dispatcher, registry = setup([prefill], [decode])
    events = asyncio.run(collect(dispatcher, request(512)))
    assert [ev.token_ids for ev in events] == [[7], [8, 9]] and idle(registry)


def test_several_candidates_per_prompt_wait_for_the_decode_workers_first_token() -> None:
    # best_of > 1: the other candidates start on the first token, and should find the prompt
    # cached on the decode worker by then (router/choices.py).
    prefill, decode = FakePrefill(first_token()), FakeDecode(DONE)
    dispatcher, registry = setup([prefill], [decode])
    req = request(512)
    req = ValidatedRequest(req.request_id, req.prompt_token_ids, req.params, best_of=2)
    events = asyncio.run(collect(dispatcher, req))
    assert [ev.token_ids for ev in events] == [[7], [8, 9]]
    assert not decode.requests[0].first_token_sent and idle(registry)


def test_decode_failing_after_prefills_token_retries_with_the_same_lease() -> None:
    prefill = FakePrefill(first_token())
    down, up = FakeDecode(error=rpc_error(UNAVAILABLE)), FakeDecode(HANDED_OFF)
    dispatcher, registry = setup([prefill], [down, up], FirstHealthy(), decode_retries=1)
    events = asyncio.run(collect(dispatcher, request(512)))
    assert [ev.token_ids for ev in events] == [[7], [8, 9]]  # no gap, no duplicate
    retried = up.requests[0]
    assert retried.kv.lease_id == "L1" and retried.first_token_sent  # not recomputed
    assert list(retried.resume_token_ids) == [] and prefill.released == [] and idle(registry)


def test_decode_failing_mid_stream_after_a_hand_off_resumes_from_every_token_sent() -> None:
    prefill = FakePrefill(first_token())
    dying = FakeDecode([withheld(8)], error=rpc_error(UNAVAILABLE))
    spare = FakeDecode([tokens(9, finish=pb.FINISH_REASON_LENGTH)])
    dispatcher, registry = setup([prefill], [dying, spare], FirstHealthy())
    events = asyncio.run(collect(dispatcher, request(512)))
    assert [ev.token_ids for ev in events] == [[7], [8], [9]]
    resumed = spare.requests[0]
    assert list(resumed.resume_token_ids) == [7, 8] and not resumed.HasField("kv")
    assert not resumed.first_token_sent and idle(registry)


def test_a_first_token_that_ends_the_request_skips_decode() -> None:
    prefill, decode = FakePrefill(first_token(finished=True)), FakeDecode(DONE)
    dispatcher, registry = setup([prefill], [decode])
    events = asyncio.run(collect(dispatcher, request(512)))
    assert [(ev.token_ids, ev.finish_reason) for ev in events] == [([7], pb.FINISH_REASON_STOP)]
    assert decode.requests == [] and idle(registry)


def test_prefill_unavailable_retries_elsewhere() -> None:
    bad, good = FakePrefill(rpc_error(UNAVAILABLE)), FakePrefill(first_token())
    dispatcher, registry = setup([bad, good], [FakeDecode(DONE)], LeastOutstandingTokens())
    registry.workers[1].load.tokens = 100  # so that the bad one is tried first
    asyncio.run(collect(dispatcher, request(512)))
    registry.workers[1].load.tokens = 0
    assert len(bad.requests) == 1 and len(good.requests) == 1
    assert not registry.workers[0].healthy and registry.workers[1].healthy
    assert idle(registry)


def test_every_prefill_worker_down_falls_back_to_local_prefill() -> None:
    bad = [FakePrefill(rpc_error(UNAVAILABLE)) for _ in range(2)]
    decode = FakeDecode(DONE)
    dispatcher, registry = setup(bad, [decode])
    events = asyncio.run(collect(dispatcher, request(512)))
    assert [ev.token_ids for ev in events] == [[7], [8, 9]]
    assert not decode.requests[0].HasField("kv") and idle(registry)


def test_prefill_rejection_is_not_retried() -> None:
    prefill, decode = FakePrefill(rpc_error(grpc.StatusCode.INVALID_ARGUMENT)), FakeDecode(DONE)
    dispatcher, registry = setup([prefill], [decode])
    with pytest.raises(UpstreamError) as info:
        asyncio.run(collect(dispatcher, request(512)))
    assert info.value.http_status == 400 and decode.requests == [] and idle(registry)


def test_decode_failing_before_a_token_releases_the_lease() -> None:
    prefill = FakePrefill(first_token())
    decode = FakeDecode(error=rpc_error(grpc.StatusCode.INTERNAL))
    dispatcher, registry = setup([prefill], [decode])

    async def scenario() -> None:
        with pytest.raises(UpstreamError):
            await collect(dispatcher, request(512))
        await asyncio.sleep(0.01)  # the release runs in the background

    asyncio.run(scenario())
    assert prefill.released == ["L1"] and idle(registry)


def test_decode_unavailable_before_a_token_retries_on_another_decoder() -> None:
    down, up = FakeDecode(error=rpc_error(UNAVAILABLE)), FakeDecode(DONE)
    dispatcher, registry = setup([], [down, up], decode_retries=1)
    events = asyncio.run(collect(dispatcher, request(10)))
    assert [ev.token_ids for ev in events] == [[7], [8, 9]]
    assert len(down.requests) == len(up.requests) == 1 and idle(registry)


def test_a_full_decoder_with_no_alternative_gives_429() -> None:
    decode = FakeDecode(error=rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED))
    dispatcher, registry = setup([], [decode], decode_retries=2)
    with pytest.raises(UpstreamError) as info:
        asyncio.run(collect(dispatcher, request(10)))
    assert info.value.http_status == 429 and len(decode.requests) == 1
    assert registry.workers[0].healthy and idle(registry)  # full is not dead


def test_an_error_mid_stream_resumes_on_another_worker_from_the_tokens_sent() -> None:
    dying, spare = FakeDecode([tokens(7)], error=rpc_error(UNAVAILABLE)), FakeDecode(RESUMED)
    dispatcher, registry = setup([], [dying, spare], FirstHealthy())
    events = asyncio.run(collect(dispatcher, request(10)))
    assert [ev.token_ids for ev in events] == [[7], [8, 9]]  # no gap, no duplicate
    resumed = spare.requests[0]
    assert list(resumed.resume_token_ids) == [7] and not resumed.HasField("kv")
    assert list(resumed.prompt_token_ids) == list(range(1, 11))
    assert resumed.sampling.max_tokens == 3  # the whole budget: the worker counts the 7
    assert not registry.workers[0].healthy and idle(registry)


def test_closing_the_stream_early_cancels_the_worker_call() -> None:
    decode = FakeDecode([tokens(7)], hang=True)
    dispatcher, registry = setup([], [decode])

    async def scenario() -> None:
        async with aclosing(dispatcher.stream(request(10), CallSlot())) as events:
            assert (await anext(events)).token_ids == [7]
            assert registry.workers[0].load.requests == 1
        # e.g. a stop string matched, or the client went away

    asyncio.run(scenario())
    assert decode.calls[0].cancelled.is_set() and idle(registry)


def test_abort_ends_the_stream_with_finish_abort() -> None:
    decode = FakeDecode([tokens(7)], hang=True)
    dispatcher, registry = setup([], [decode])

    async def scenario() -> list[WorkerTokens]:
        slot = CallSlot()
        out = []
        async with aclosing(dispatcher.stream(request(10), slot)) as events:
            async for ev in events:
                out.append(ev)
                slot.abort()  # what Inference.Abort does
        return out

    events = asyncio.run(scenario())
    assert [ev.finish_reason for ev in events] == [0, pb.FINISH_REASON_ABORT]
    assert idle(registry)


def test_load_is_counted_while_in_flight() -> None:
    dispatcher, registry = setup([], [FakeDecode(hang=True)])

    async def load_while_prefilling() -> tuple[int, int]:
        slot = CallSlot()
        async with aclosing(dispatcher.stream(request(100), slot)) as events:
            pending = asyncio.create_task(anext(events))
            await asyncio.sleep(0.01)  # the worker is busy, nothing streamed yet
            w = registry.workers[0]
            load = w.load.tokens, w.load.requests
            slot.abort()
            assert (await pending).finish_reason == pb.FINISH_REASON_ABORT
        return load

    # 100 uncached prompt tokens to prefill + 3 to generate.
    assert asyncio.run(load_while_prefilling()) == (103, 1) and idle(registry)
    # Its 6 full blocks (96 tokens) are now cached there: 4 to prefill + 3 to generate.
    assert asyncio.run(load_while_prefilling()) == (7, 1) and idle(registry)


# ---- data parallelism: replicas dying, leaving ------------------------------------------------
class FirstHealthy(Policy):
    """Always the first worker offered: the retry order is the registry's order."""

    name = "first"

    def _select(self, workers, job):
        return workers[0]


def test_dead_replicas_before_a_token_are_skipped_until_one_answers() -> None:
    down = [FakeDecode(error=rpc_error(UNAVAILABLE)) for _ in range(2)]
    up = FakeDecode(DONE)
    dispatcher, registry = setup([], [*down, up], FirstHealthy(), decode_retries=2)
    events = asyncio.run(collect(dispatcher, request(10)))
    assert [ev.token_ids for ev in events] == [[7], [8, 9]]
    assert [len(d.requests) for d in (*down, up)] == [1, 1, 1]
    assert [w.healthy for w in registry.workers] == [False, False, True] and idle(registry)


def test_every_replica_dead_gives_unavailable_after_trying_each_once() -> None:
    down = [FakeDecode(error=rpc_error(UNAVAILABLE)) for _ in range(3)]
    dispatcher, registry = setup([], down, decode_retries=5)
    with pytest.raises(UpstreamError) as info:
        asyncio.run(collect(dispatcher, request(10)))
    assert info.value.grpc_code == UNAVAILABLE and info.value.http_status == 503
    assert [len(d.requests) for d in down] == [1, 1, 1] and idle(registry)


def test_past_max_migrations_the_request_fails_naming_every_attempt() -> None:
    dying = [FakeDecode([tokens(7 + i)], error=rpc_error(UNAVAILABLE)) for i in range(3)]
    dispatcher, registry = setup([], dying, FirstHealthy(), max_migrations=1)

    async def scenario() -> list[WorkerTokens]:
        seen: list[WorkerTokens] = []
        with pytest.raises(UnavailableError) as info:
            async with aclosing(dispatcher.stream(request(10), CallSlot())) as events:
                async for ev in events:
                    seen.append(ev)
        message = info.value.message
        assert info.value.grpc_code == UNAVAILABLE and "after 2 attempts" in message
        assert "d0:1: failed: UNAVAILABLE" in message and "d1:1: failed" in message
        return seen

    seen = asyncio.run(scenario())
    assert [ev.token_ids for ev in seen] == [[7], [8]]  # each relayed once
    assert list(dying[1].requests[0].resume_token_ids) == [7]
    assert dying[2].requests == [] and idle(registry)


def test_no_migration_allowed_fails_mid_stream_with_unavailable() -> None:
    dying, spare = FakeDecode([tokens(7)], error=rpc_error(UNAVAILABLE)), FakeDecode(DONE)
    dispatcher, registry = setup([], [dying, spare], max_migrations=0)
    with pytest.raises(UnavailableError) as info:
        asyncio.run(collect(dispatcher, request(10)))
    assert "1 tokens sent" in info.value.message and spare.requests == [] and idle(registry)


def test_a_stream_that_ends_without_finishing_is_resumed_elsewhere() -> None:
    cut, spare = FakeDecode([tokens(7)]), FakeDecode(RESUMED)
    dispatcher, registry = setup([], [cut, spare], FirstHealthy())
    events = asyncio.run(collect(dispatcher, request(10)))
    assert [ev.token_ids for ev in events] == [[7], [8, 9]]
    assert list(spare.requests[0].resume_token_ids) == [7] and idle(registry)


def test_a_silent_stream_past_the_idle_timeout_is_resumed_elsewhere() -> None:
    hung, spare = FakeDecode([tokens(7)], hang=True), FakeDecode(RESUMED)
    dispatcher, registry = setup([], [hung, spare], FirstHealthy(), stream_idle_timeout_s=0.2)
    events = asyncio.run(collect(dispatcher, request(10)))
    assert [ev.token_ids for ev in events] == [[7], [8, 9]]
    assert hung.calls[0].cancelled.is_set() and not registry.workers[0].healthy
    assert idle(registry)


def test_a_long_wait_for_the_first_token_is_not_taken_for_a_hang() -> None:
    """The idle bound counts from the first message: before it the worker is prefilling, which
    under load may take longer than any gap between tokens (its health checks still pass)."""
    slow, spare = FakeDecode(DONE, first_delay_s=0.5), FakeDecode(DONE)
    dispatcher, registry = setup([], [slow, spare], FirstHealthy(), stream_idle_timeout_s=0.2)
    events = asyncio.run(collect(dispatcher, request(10)))
    assert [ev.token_ids for ev in events] == [[7], [8, 9]]
    assert spare.requests == [] and len(slow.calls) == 1  # served where it started
    assert registry.workers[0].healthy and idle(registry)


def test_a_failed_health_check_moves_a_silent_stream_but_not_a_flowing_one() -> None:
    hung, spare = FakeDecode([tokens(7)], hang=True), FakeDecode(RESUMED)
    dispatcher, registry = setup([], [hung, spare], FirstHealthy())
    worker = registry.workers[0]

    async def scenario() -> list[WorkerTokens]:
        out = []
        async with aclosing(dispatcher.stream(request(10), CallSlot())) as events:
            out.append(await anext(events))
            worker.note_down(time.monotonic() - 10)  # a check that began before token 7
            await asyncio.sleep(0.05)
            assert not hung.calls[0].cancelled.is_set()  # the stream spoke since: alive
            worker.note_down(time.monotonic())  # a check that got no answer, nor did we
            out += [ev async for ev in events]
        return out

    events = asyncio.run(scenario())
    assert [ev.token_ids for ev in events] == [[7], [8, 9]]
    assert hung.calls[0].cancelled.is_set() and idle(registry)


def test_a_request_on_a_removed_replica_finishes_normally() -> None:
    decode = FakeDecode(DONE)
    dispatcher, registry = setup([], [decode])
    worker = registry.workers[0]

    async def scenario() -> list[WorkerTokens]:
        out = []
        async with aclosing(dispatcher.stream(request(10), CallSlot())) as events:
            async for ev in events:
                out.append(ev)
                if len(out) == 1:
                    assert registry.remove(worker.address)  # it leaves mid-request
                    assert worker.load.requests == 1
        return out

    events = asyncio.run(scenario())
    assert [ev.token_ids for ev in events] == [[7], [8, 9]]
    assert events[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert registry.workers == [] and len(decode.requests) == 1
    assert worker.removed and worker.load.requests == worker.load.tokens == 0


# ---- hung prefill workers ---------------------------------------------------------------------
def test_a_prefill_worker_that_hangs_is_left_once_a_health_check_fails() -> None:
    hung, decode = FakePrefill(HANG), FakeDecode(DONE)
    dispatcher, registry = setup([hung], [decode])
    prefill_worker = registry.workers[0]

    async def scenario() -> list[WorkerTokens]:
        async with aclosing(dispatcher.stream(request(512), CallSlot())) as events:
            pending = asyncio.create_task(anext(events))
            await asyncio.sleep(0.05)
            assert not pending.done() and len(hung.requests) == 1  # stuck in Prefill
            prefill_worker.note_down(time.monotonic())  # its check got no answer either
            return [await pending] + [ev async for ev in events]

    events = asyncio.run(scenario())
    assert [ev.token_ids for ev in events] == [[7], [8, 9]]
    assert not decode.requests[0].HasField("kv")  # prefilled on the decode worker instead
    assert not prefill_worker.healthy and idle(registry)


# ---- admission control --------------------------------------------------------------------------
def limited(num_decoders: int = 1, **admission: Any) -> tuple[Dispatcher, WorkerRegistry, list]:
    decoders = [FakeDecode(hang=True) for _ in range(num_decoders)]
    dispatcher, registry = setup(
        [], decoders, admission=AdmissionConfig(**{"worker_max_requests": 1, **admission})
    )
    return dispatcher, registry, decoders


async def start(dispatcher: Dispatcher, n: int = 10) -> tuple[CallSlot, asyncio.Task]:
    """A request running in the background (its first event awaited by the task)."""
    slot = CallSlot()
    events = dispatcher.stream(request(n), slot)
    task = asyncio.create_task(anext(events))
    await asyncio.sleep(0.01)
    task.events = events  # type: ignore[attr-defined]
    return slot, task


async def finish(slot: CallSlot, task: asyncio.Task) -> WorkerTokens:
    slot.abort()
    ev = await task
    await task.events.aclose()  # type: ignore[attr-defined]
    return ev


def test_a_full_pool_queues_requests_and_admits_them_in_order_as_room_frees() -> None:
    dispatcher, registry, decoders = limited(max_queued_requests=2, queue_timeout_s=30)

    async def scenario() -> None:
        a = await start(dispatcher)
        b = await start(dispatcher)
        c = await start(dispatcher)
        assert len(decoders[0].requests) == 1 and dispatcher.admission.num_queued == 2
        assert (await finish(*a)).finish_reason == pb.FINISH_REASON_ABORT
        await asyncio.sleep(0.01)
        assert len(decoders[0].requests) == 2 and dispatcher.admission.num_queued == 1
        await finish(*b)
        await asyncio.sleep(0.01)
        assert len(decoders[0].requests) == 3 and dispatcher.admission.num_queued == 0
        await finish(*c)

    asyncio.run(scenario())
    assert idle(registry)


def test_beyond_the_queue_a_request_gets_429_at_once() -> None:
    dispatcher, registry, _ = limited(max_queued_requests=1, queue_timeout_s=30)

    async def scenario() -> None:
        running, queued = await start(dispatcher), await start(dispatcher)
        with pytest.raises(QueueFullError) as info:
            await collect(dispatcher, request(10))
        err = info.value
        assert (err.http_status, err.grpc_code) == (429, grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert err.code == "server_overloaded" and err.retry_after >= 1
        await finish(*running)
        await finish(*queued)

    asyncio.run(scenario())
    assert idle(registry) and dispatcher.admission.num_queued == 0


def test_a_queued_request_gets_429_after_the_queue_timeout() -> None:
    dispatcher, registry, decoders = limited(max_queued_requests=4, queue_timeout_s=0.1)

    async def scenario() -> None:
        running = await start(dispatcher)
        with pytest.raises(QueueFullError, match=r"within 0\.1 s"):
            await collect(dispatcher, request(10))
        await finish(*running)

    asyncio.run(scenario())
    assert len(decoders[0].requests) == 1 and idle(registry)


def test_requests_go_to_the_decoder_with_room() -> None:
    dispatcher, registry, decoders = limited(2, max_queued_requests=0)

    async def scenario() -> None:
        a, b = await start(dispatcher), await start(dispatcher)
        assert [len(d.requests) for d in decoders] == [1, 1]
        with pytest.raises(QueueFullError):
            await collect(dispatcher, request(10))
        await finish(*a)
        await finish(*b)

    asyncio.run(scenario())
    assert idle(registry)


def test_the_default_limit_comes_from_the_workers_report() -> None:
    assert reported_limit(None) is None  # nothing reported: no limit, as before
    assert reported_limit(pb.WorkerLoad()) is None
    report = pb.WorkerLoad(max_num_seqs=2, max_waiting_requests=256)
    assert reported_limit(report) == 2  # by default: what it runs at once
    assert reported_limit(report, allowance=3) == 5
    assert reported_limit(pb.WorkerLoad(max_num_seqs=64, max_waiting_requests=4), 16) == 68
    for allowance in (0, 1):
        dispatcher, registry = setup(
            [], [FakeDecode(hang=True)], admission=AdmissionConfig(waiting_allowance=allowance)
        )
        worker = registry.workers[0]
        worker.reported = report
        limit = 2 + allowance

        async def scenario(dispatcher=dispatcher, worker=worker, limit=limit) -> None:
            held = [await start(dispatcher) for _ in range(limit)]
            assert worker.load.requests == limit and dispatcher.admission.num_queued == 0
            extra = await start(dispatcher)
            assert worker.load.requests == limit and dispatcher.admission.num_queued == 1
            for slot, task in [*held, extra]:
                await finish(slot, task)

        asyncio.run(scenario())
        assert idle(registry)


def test_a_token_bound_queues_large_requests_but_never_starves_an_idle_worker() -> None:
    dispatcher, registry, decoders = limited(
        worker_max_requests=10, worker_max_tokens=150, max_queued_requests=0
    )

    async def scenario() -> None:
        big = await start(dispatcher, n=400)  # alone on an idle worker: always admitted
        with pytest.raises(QueueFullError):
            await collect(dispatcher, request(10))  # 10 more tokens would pass the bound
        await finish(*big)
        small = [await start(dispatcher, n=60) for _ in range(2)]  # 63 + 63 <= 150
        assert len(decoders[0].requests) == 3
        for slot, task in small:
            await finish(slot, task)

    asyncio.run(scenario())
    assert idle(registry)


# ---- deadlines and interruptions ----------------------------------------------------------------
def test_a_deadline_ends_a_silent_stream_with_504() -> None:
    decode = FakeDecode([tokens(7)], hang=True)
    dispatcher, registry = setup([], [decode])

    async def scenario() -> list[WorkerTokens]:
        seen = []
        with pytest.raises(DeadlineExceededError) as info:
            stream = dispatcher.stream(request(10), CallSlot(), deadline=Deadline.after(0.2))
            async with aclosing(stream) as events:
                async for ev in events:
                    seen.append(ev)
        err = info.value
        assert (err.http_status, err.grpc_code) == (504, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert "after 1 tokens" in err.message
        return seen

    assert [ev.token_ids for ev in asyncio.run(scenario())] == [[7]]
    assert decode.calls[0].cancelled.is_set() and registry.workers[0].healthy and idle(registry)


def test_a_deadline_ends_a_queued_request_with_504() -> None:
    dispatcher, registry, _ = limited(max_queued_requests=4, queue_timeout_s=30)

    async def scenario() -> None:
        running = await start(dispatcher)
        with pytest.raises(DeadlineExceededError):
            stream = dispatcher.stream(request(10), CallSlot(), deadline=Deadline.after(0.1))
            await anext(stream)
        assert dispatcher.admission.num_queued == 0
        await finish(*running)

    asyncio.run(scenario())
    assert idle(registry)


def test_an_interrupted_request_raises_the_error_it_was_given() -> None:
    decode = FakeDecode([tokens(7)], hang=True)
    dispatcher, registry = setup([], [decode])

    async def scenario() -> None:
        slot = CallSlot()
        async with aclosing(dispatcher.stream(request(10), slot)) as events:
            assert (await anext(events)).token_ids == [7]
            slot.interrupt(UnavailableError("the router is shutting down"))
            with pytest.raises(UnavailableError, match="shutting down"):
                await anext(events)

    asyncio.run(scenario())
    assert decode.calls[0].cancelled.is_set() and idle(registry)


def test_queued_requests_fail_at_once_when_the_router_drains() -> None:
    dispatcher, registry, _ = limited(max_queued_requests=4, queue_timeout_s=30)

    async def scenario() -> None:
        running = await start(dispatcher)
        queued = asyncio.create_task(collect(dispatcher, request(10)))
        await asyncio.sleep(0.01)
        assert dispatcher.admission.fail_queued(UnavailableError("draining")) == 1
        with pytest.raises(UnavailableError, match="draining"):
            await queued
        await finish(*running)

    asyncio.run(scenario())
    assert idle(registry)
