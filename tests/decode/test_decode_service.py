"""The Decode servicer in this process on tiny engines: adopt, fall back, cancel, abort, errors."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from models import TINY
from ports import free_port
from workers_util import (
    aio_channel,
    assert_idle,
    prompt,
    running,
    serve_decode,
    serve_prefill,
    tiny_engine,
    tokens,
)

from splitserve.engine.sampling_params import SamplingParams
from splitserve.kvstore.backends import MemoryBackend
from splitserve.kvstore.service import KVStoreServicer
from splitserve.v1 import pb, rpc
from splitserve.workers.kvstore_client import KVStoreClient

P = prompt(22)
N = 10
GREEDY = pb.SamplingOptions(max_tokens=N, temperature=0, ignore_eos=True)


def expected(p: list[int] = P, n: int = N) -> list[int]:
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    return tiny_engine().generate([p], params)[0].new_token_ids


async def generate(stub: rpc.DecodeStub, req: pb.DecodeRequest) -> list[pb.DecodeResponse]:
    return [r async for r in stub.Generate(req, timeout=30)]


async def read_all(call) -> list[pb.DecodeResponse]:
    """The rest of a stream already read with `read()` (the two APIs can't be mixed)."""
    out = []
    while (r := await call.read()) is not grpc.aio.EOF:
        out.append(r)
    return out


async def start_long(stub: rpc.DecodeStub, request_id: str) -> grpc.aio.UnaryStreamCall:
    """A 100-token stream of P, its first response already read: a request that stays live."""
    long = pb.SamplingOptions(max_tokens=100, temperature=0, ignore_eos=True)
    call = stub.Generate(pb.DecodeRequest(request_id=request_id, prompt_token_ids=P, sampling=long))
    await call.read()
    return call


async def prefill(address: str, sampling: pb.SamplingOptions = GREEDY) -> pb.PrefillResponse:
    async with aio_channel(address) as channel:
        req = pb.PrefillRequest(prompt_token_ids=P, sampling=sampling)
        return await rpc.PrefillStub(channel).Prefill(req, timeout=10)


def with_kv(resp: pb.PrefillResponse, **kw) -> pb.DecodeRequest:
    return pb.DecodeRequest(
        request_id="d1",
        prompt_token_ids=P,
        sampling=kw.pop("sampling", GREEDY),
        kv=resp.kv,
        first_token_id=resp.first_token_id,
        **kw,
    )


@pytest.mark.asyncio
async def test_disaggregated_equals_one_engine_with_logprobs():
    sampling = pb.SamplingOptions(max_tokens=N, temperature=0, ignore_eos=True, logprobs=1)
    async with (
        running(serve_prefill(tiny_engine(), chunk_bytes=2048)) as pre,
        running(serve_decode(tiny_engine())) as dec,
        aio_channel(dec.address) as channel,
    ):
        first = await prefill(pre.address, sampling)
        req = with_kv(first, sampling=sampling, first_logprob=first.first_logprob)
        responses = await generate(rpc.DecodeStub(channel), req)
        assert tokens(responses) == expected()
        assert [len(r.logprobs) for r in responses] == [len(r.token_ids) for r in responses]
        assert responses[0].logprobs[0] == first.first_logprob
        last = responses[-1]
        assert last.finish_reason == pb.FINISH_REASON_LENGTH
        assert last.usage.prompt_tokens == len(P) and last.usage.completion_tokens == N
        assert dec.worker.metrics.value("kv_transfer_bytes_total", direction="received") == (
            first.kv.num_bytes
        )
        assert dec.worker.metrics.value("kv_transfer_fallbacks_total") == 0
        assert len(pre.servicer.leases) == 0
        assert_idle(dec)


@pytest.mark.asyncio
async def test_a_first_token_already_sent_is_left_out_of_the_stream():
    sampling = pb.SamplingOptions(max_tokens=N, temperature=0, ignore_eos=True, logprobs=1)
    async with (
        running(serve_prefill(tiny_engine())) as pre,
        running(serve_decode(tiny_engine())) as dec,
        aio_channel(dec.address) as channel,
    ):
        first = await prefill(pre.address, sampling)
        req = with_kv(first, sampling=sampling, first_token_sent=True)
        responses = await generate(rpc.DecodeStub(channel), req)
        assert responses[0].first_token_withheld
        assert not any(r.first_token_withheld for r in responses[1:])
        assert tokens(responses) == expected()[1:]  # the router sent expected()[0]
        assert [len(r.logprobs) for r in responses] == [len(r.token_ids) for r in responses]
        assert responses[-1].usage.completion_tokens == N  # the first one counts
        assert dec.worker.metrics.value("kv_transfer_fallbacks_total") == 0
        assert_idle(dec)


@pytest.mark.asyncio
async def test_a_first_token_already_sent_is_kept_when_the_kv_cannot_be_pulled():
    """The fallback prefills prompt + the token the client has, and goes on after it: a
    sampled first token other than this worker's own draw must not be replaced."""
    sampling = pb.SamplingOptions(max_tokens=N, temperature=0, ignore_eos=True, prompt_logprobs=1)
    async with (
        running(serve_decode(tiny_engine(), pull_timeout_s=2)) as dec,
        aio_channel(dec.address) as channel,
    ):
        own = expected()[0]
        other = (
            own + 1
        ) % TINY.vocab_size  # what, say, a temperature-1 draw on the prefill worker gave
        dead = pb.KVHandle(prefill_address=f"127.0.0.1:{free_port()}", lease_id="x")
        dead.num_tokens = len(P)
        req = pb.DecodeRequest(
            request_id="d1",
            prompt_token_ids=P,
            sampling=sampling,
            kv=dead,
            first_token_id=other,
            first_token_sent=True,
        )
        responses = await generate(rpc.DecodeStub(channel), req)
        assert responses[0].first_token_withheld
        assert tokens(responses) == expected([*P, other], N - 1)
        assert not any(r.prompt_logprobs for r in responses)  # they went out with the token
        assert dec.worker.metrics.value("kv_transfer_fallbacks_total") == 1
        assert_idle(dec)


@pytest.mark.asyncio
async def test_without_kv_the_worker_prefills_itself():
    async with (
        running(serve_decode(tiny_engine(), role="colocated")) as dec,
        aio_channel(dec.address) as channel,
    ):
        stub = rpc.DecodeStub(channel)
        req = pb.DecodeRequest(request_id="c1", prompt_token_ids=P, sampling=GREEDY)
        assert tokens(await generate(stub, req)) == expected()
        load = await stub.GetLoad(pb.LoadRequest(), timeout=5)
        assert load.role == "colocated" and load.num_running == 0
        assert_idle(dec)


@pytest.mark.asyncio
async def test_dead_or_stale_prefill_falls_back_to_local_prefill():
    async with (
        running(serve_prefill(tiny_engine())) as pre,
        running(serve_decode(tiny_engine(), pull_timeout_s=2)) as dec,
        aio_channel(dec.address) as channel,
    ):
        stub = rpc.DecodeStub(channel)
        first = await prefill(pre.address)
        dead = pb.KVHandle(
            prefill_address=f"127.0.0.1:{free_port()}", lease_id="x", num_tokens=len(P)
        )
        req = with_kv(first)
        req.kv.CopyFrom(dead)
        assert tokens(await generate(stub, req)) == expected()
        # a lease that is gone (already released) falls back the same way
        await rpc.PrefillStub(aio_channel(pre.address)).ReleaseKV(
            pb.ReleaseKVRequest(lease_id=first.kv.lease_id), timeout=5
        )
        assert tokens(await generate(stub, with_kv(first))) == expected()
        assert dec.worker.metrics.value("kv_transfer_fallbacks_total") == 2
        assert_idle(dec)


@pytest.mark.asyncio
async def test_kv_from_a_differently_shaped_cache_is_rejected_before_allocation():
    # block size 8 on the prefill side: the header can't fit this worker's cache
    async with (
        running(serve_prefill(tiny_engine(block_size=8))) as pre,
        running(serve_decode(tiny_engine())) as dec,
        aio_channel(dec.address) as channel,
    ):
        first = await prefill(pre.address)
        assert tokens(await generate(rpc.DecodeStub(channel), with_kv(first))) == expected()
        assert dec.worker.metrics.value("kv_transfer_bytes_total", direction="received") == 0
        assert dec.worker.metrics.value("kv_transfer_fallbacks_total") == 1
        assert_idle(dec)


async def _until(condition, seconds: float) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)


@pytest.mark.asyncio
@pytest.mark.parametrize("stays_full", [False, True], ids=["frees-in-time", "stays-full"])
async def test_kv_for_a_full_pool_waits_for_blocks_and_is_never_refused(stays_full):
    """Blocks freed while the request waits: the KV is adopted. A pool still full after
    --kv-reserve-wait-s: the remote KV is let go and the prompt queued here, to run once
    blocks free. Either way the request completes and no lease or block is left."""
    wait = 0.2 if stays_full else 10.0
    async with (
        running(serve_prefill(tiny_engine())) as pre,
        running(serve_decode(tiny_engine(num_blocks=8), reserve_wait_s=wait)) as dec,
        aio_channel(dec.address) as channel,
    ):
        first = await prefill(pre.address)  # 22 tokens: 6 blocks of 4, only 5 free
        held = await dec.worker.engine.reserve_prefilled("hog", prompt(12), SamplingParams())
        call = asyncio.ensure_future(generate(rpc.DecodeStub(channel), with_kv(first)))

        def fallbacks() -> float:
            return dec.worker.metrics.value("kv_transfer_fallbacks_total")

        await _until(lambda: fallbacks() == 1, 4.0 if stays_full else 0.3)
        assert fallbacks() == int(stays_full)
        assert not call.done()  # waiting for blocks, or queued in the engine: not refused
        held.close()  # a running request ends and frees its blocks
        assert tokens(await call) == expected()
        received = dec.worker.metrics.value("kv_transfer_bytes_total", direction="received")
        assert (received > 0) is not stays_full
        await _until(lambda: not pre.servicer.leases, 2.0)  # a release arrives asynchronously
        assert len(pre.servicer.leases) == 0
        await asyncio.sleep(0.05)
        assert_idle(dec)


@pytest.mark.asyncio
async def test_client_cancel_and_abort_return_blocks():
    async with (
        running(serve_decode(tiny_engine())) as dec,
        aio_channel(dec.address) as channel,
    ):
        stub = rpc.DecodeStub(channel)
        call = await start_long(stub, "c")
        call.cancel()
        for _ in range(100):  # the server sees the cancellation asynchronously
            if dec.worker.engine.num_live_requests == 0:
                break
            await asyncio.sleep(0.02)
        await dec.worker.engine.call(lambda e: None)  # the abort it queued has run
        assert_idle(dec)

        call = await start_long(stub, "a")
        assert (await stub.Abort(pb.AbortRequest(request_id="a"), timeout=5)).found
        rest = await read_all(call)
        assert rest[-1].finish_reason == pb.FINISH_REASON_ABORT
        assert rest[-1].usage.prompt_tokens == len(P)
        assert not (await stub.Abort(pb.AbortRequest(request_id="a"), timeout=5)).found
        assert_idle(dec)


@pytest.mark.parametrize(
    ("req", "needle"),
    [
        (pb.DecodeRequest(prompt_token_ids=[]), "empty"),
        (pb.DecodeRequest(prompt_token_ids=[1, 4000]), "token ids"),
        (
            pb.DecodeRequest(prompt_token_ids=P, sampling=pb.SamplingOptions(top_k=-5)),
            "top_k",
        ),
        (
            pb.DecodeRequest(prompt_token_ids=P, kv=pb.KVHandle(num_tokens=len(P))),
            "first_token_id",
        ),
        (
            pb.DecodeRequest(prompt_token_ids=P, kv=pb.KVHandle(num_tokens=3), first_token_id=5),
            "kv covers",
        ),
        (pb.DecodeRequest(prompt_token_ids=P, first_token_sent=True), "first_token_sent needs"),
        (  # the client has its one token: nothing is left to generate
            pb.DecodeRequest(
                prompt_token_ids=P,
                sampling=pb.SamplingOptions(max_tokens=1),
                kv=pb.KVHandle(num_tokens=len(P)),
                first_token_id=5,
                first_token_sent=True,
            ),
            "leave nothing to generate",
        ),
    ],
)
@pytest.mark.asyncio
async def test_bad_requests_are_invalid_argument_and_the_worker_keeps_serving(req, needle):
    async with (
        running(serve_decode(tiny_engine())) as dec,
        aio_channel(dec.address) as channel,
    ):
        stub = rpc.DecodeStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate(stub, req)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert needle in err.value.details()
        ok = pb.DecodeRequest(prompt_token_ids=prompt(5), sampling=GREEDY)
        assert len(tokens(await generate(stub, ok))) == N
        assert_idle(dec)


@pytest.mark.asyncio
async def test_duplicate_live_request_id_is_already_exists():
    async with (
        running(serve_decode(tiny_engine())) as dec,
        aio_channel(dec.address) as channel,
    ):
        stub = rpc.DecodeStub(channel)
        call = await start_long(stub, "same")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate(stub, pb.DecodeRequest(request_id="same", prompt_token_ids=P))
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        call.cancel()


@pytest.mark.asyncio
async def test_colocated_workers_share_prefixes_through_the_kvstore():
    store_server = grpc.aio.server()
    rpc.add_KVStoreServicer_to_server(KVStoreServicer(MemoryBackend(1 << 26)), store_server)
    store_address = f"127.0.0.1:{store_server.add_insecure_port('127.0.0.1:0')}"
    await store_server.start()
    clients = [KVStoreClient(store_address, timeout_s=5) for _ in range(2)]
    req = pb.DecodeRequest(prompt_token_ids=P, sampling=GREEDY)
    try:
        async with (
            running(serve_decode(tiny_engine(), store=clients[0], role="colocated")) as a,
            running(serve_decode(tiny_engine(), store=clients[1], role="colocated")) as b,
            aio_channel(a.address) as ca,
            aio_channel(b.address) as cb,
        ):
            first = await generate(rpc.DecodeStub(ca), req)
            assert tokens(first) == expected() and first[-1].usage.cached_prompt_tokens == 0
            for _ in range(500):  # written back in the background once the request finished
                if clients[0].counters.puts == 5:
                    break
                await asyncio.sleep(0.02)
            second = await generate(rpc.DecodeStub(cb), req)
            assert tokens(second) == expected()
            assert second[-1].usage.cached_prompt_tokens == 20
            assert b.worker.metrics.value("kvstore_blocks_fetched_total") == 5
            assert_idle(a)
            assert_idle(b)
    finally:
        for client in clients:
            await client.close()
        await store_server.stop(None)
