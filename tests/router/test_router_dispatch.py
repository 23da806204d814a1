"""Dispatcher unit tests, with scripted worker stubs in place of channels: the disaggregation
decision, prefill retries and the local fallback, the KV handoff, lease release, abort, and load
counters back at zero on every exit (finish, error, caller gone)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import grpc
import pytest

from splitserve.engine.hashing import kv_namespace
from splitserve.engine.sampling_params import SamplingParams
from splitserve.router.dispatch import CallSlot, DispatchConfig, Dispatcher, WorkerTokens
from splitserve.router.errors import UnavailableError, UpstreamError
from splitserve.router.policy import LeastOutstandingTokens, Policy, RoundRobin
from splitserve.router.registry import WorkerRegistry
from splitserve.router.validation import ValidatedRequest
from splitserve.v1 import pb, rpc

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "scripted")


class FakeUnary:
    """An awaitable call with cancel(), like grpc.aio's UnaryUnaryCall."""

    def __init__(self, result: Any) -> None:
        self.result = result

    def __await__(self) -> Any:
        yield from asyncio.sleep(0).__await__()
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result

    def cancel(self) -> bool:
        return True


class FakeStream:
    """A server stream: scripted responses, then an error or an end; `hang` waits for cancel."""

    def __init__(self, responses: list[pb.DecodeResponse], error: Exception | None, hang: bool):
        self.responses, self.error, self.hang = responses, error, hang
        self.cancelled = asyncio.Event()

    def cancel(self) -> bool:
        self.cancelled.set()
        return True

    def __aiter__(self) -> AsyncIterator[pb.DecodeResponse]:
        return self._run()

    async def _run(self) -> AsyncIterator[pb.DecodeResponse]:
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
    def __init__(self, responses=(), error: Exception | None = None, hang: bool = False) -> None:
        self.script = (list(responses), error, hang)
        self.requests: list[pb.DecodeRequest] = []
        self.calls: list[FakeStream] = []

    def Generate(self, request: pb.DecodeRequest, **kw: Any) -> FakeStream:
        self.requests.append(request)
        self.calls.append(FakeStream(*self.script))
        return self.calls[-1]


def tokens(*ids: int, finish: int = 0) -> pb.DecodeResponse:
    return pb.DecodeResponse(token_ids=ids, finish_reason=finish)


DONE = [tokens(7), tokens(8, 9, finish=pb.FINISH_REASON_LENGTH)]


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


def test_disaggregated_request_hands_the_kv_to_decode() -> None:
    prefill, decode = FakePrefill(first_token()), FakeDecode(DONE)
    dispatcher, registry = setup([prefill], [decode])
    events = asyncio.run(collect(dispatcher, request(512)))
    assert [ev.token_ids for ev in events] == [[7], [8, 9]]  # the decode stream has them all
    sent = decode.requests[0]
    assert sent.kv.lease_id == "L1" and sent.first_token_id == 7
    assert all(ev.num_cached_tokens == 32 for ev in events)  # the prefill worker's cache hit
    assert prefill.released == [] and idle(registry)


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


def test_error_mid_stream_fails_the_request_and_frees_the_load() -> None:
    decode = FakeDecode([tokens(7)], error=rpc_error(UNAVAILABLE))
    dispatcher, registry = setup([], [decode, FakeDecode(DONE)])
    with pytest.raises(UpstreamError):  # a token was relayed: no retry
        asyncio.run(collect(dispatcher, request(10)))
    assert idle(registry)


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


def test_a_replica_dying_mid_stream_fails_the_request_with_unavailable() -> None:
    dying, spare = FakeDecode([tokens(7)], error=rpc_error(UNAVAILABLE)), FakeDecode(DONE)
    dispatcher, registry = setup([], [dying, spare], decode_retries=2)

    async def scenario() -> list[WorkerTokens]:
        seen: list[WorkerTokens] = []
        with pytest.raises(UpstreamError) as info:
            async with aclosing(dispatcher.stream(request(10), CallSlot())) as events:
                async for ev in events:
                    seen.append(ev)
        assert info.value.grpc_code == UNAVAILABLE and "mid-stream" in info.value.message
        return seen

    seen = asyncio.run(scenario())
    assert [ev.token_ids for ev in seen] == [[7]]  # relayed once, never redone elsewhere
    assert spare.requests == [] and not registry.workers[0].healthy and idle(registry)


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
