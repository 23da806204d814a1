"""Workers in this process on tiny engines: resuming a migrated request (DecodeRequest's
resume_token_ids), the capacity GetLoad reports for admission control, and RPC deadlines that
abort the engine request and give its KV back."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from workers_util import (
    aio_channel,
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
SEEDED = pb.SamplingOptions(max_tokens=N, temperature=1.0, seed=99, ignore_eos=True)
STALL_S = 1.5  # how long the engine thread is held busy in the deadline tests


def reference(options: pb.SamplingOptions) -> list[int]:
    """The uninterrupted run, in one engine."""
    params = SamplingParams(
        max_tokens=options.max_tokens,
        temperature=options.temperature,
        seed=options.seed if options.HasField("seed") else None,
        ignore_eos=True,
    )
    return tiny_engine().generate([P], params)[0].new_token_ids


async def generate(stub: rpc.DecodeStub, req: pb.DecodeRequest, timeout: float = 30):
    return [r async for r in stub.Generate(req, timeout=timeout)]


async def wait_idle(served, timeout_s: float = 10.0) -> None:
    """Every block back in the pool and no request live (an abort lands a moment later)."""
    bm = served.worker.engine.engine.block_manager
    deadline = time.monotonic() + timeout_s
    while bm.num_free_blocks != bm.num_blocks or served.worker.engine.num_live_requests:
        assert time.monotonic() < deadline, (bm.num_free_blocks, bm.num_blocks)
        await asyncio.sleep(0.02)
    bm.check_integrity()


def stall(served, seconds: float = STALL_S) -> asyncio.Future:
    """Hold the engine thread busy, as a stuck step would: commands queue behind it."""
    return asyncio.ensure_future(served.worker.engine.call(lambda e: time.sleep(seconds)))


@pytest.mark.asyncio
@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
async def test_a_resumed_request_streams_exactly_the_rest(sampling):
    whole = reference(sampling)
    assert len(whole) == N
    async with (
        running(serve_decode(tiny_engine(), role="colocated")) as dec,
        aio_channel(dec.address) as channel,
    ):
        stub = rpc.DecodeStub(channel)
        for k in (0, 1, 4, N - 1):
            req = pb.DecodeRequest(
                request_id=f"r{k}", prompt_token_ids=P, sampling=sampling,
                resume_token_ids=whole[:k],
            )  # fmt: skip
            responses = await generate(stub, req)
            assert tokens(responses) == whole[k:], k
            last = responses[-1]
            assert last.finish_reason == pb.FINISH_REASON_LENGTH
            assert last.usage.completion_tokens == N  # the resumed ones count
            assert last.usage.cached_prompt_tokens <= len(P)
        await wait_idle(dec)


@pytest.mark.asyncio
async def test_a_resumed_request_uses_the_kvstore_for_its_prompt():
    store_server = grpc.aio.server()
    rpc.add_KVStoreServicer_to_server(KVStoreServicer(MemoryBackend(1 << 26)), store_server)
    store_address = f"127.0.0.1:{store_server.add_insecure_port('127.0.0.1:0')}"
    await store_server.start()
    clients = [KVStoreClient(store_address, timeout_s=5) for _ in range(2)]
    whole = reference(GREEDY)
    try:
        async with (
            running(serve_decode(tiny_engine(), store=clients[0], role="colocated")) as a,
            running(serve_decode(tiny_engine(), store=clients[1], role="colocated")) as b,
            aio_channel(a.address) as ca,
            aio_channel(b.address) as cb,
        ):
            req = pb.DecodeRequest(prompt_token_ids=P, sampling=GREEDY)
            assert tokens(await generate(rpc.DecodeStub(ca), req)) == whole
            for _ in range(500):  # written back in the background once the request finished
                if clients[0].counters.puts == 5:
                    break
                await asyncio.sleep(0.02)
            # `a` died after 3 tokens: `b` resumes with the prompt's blocks from the store.
            req.resume_token_ids.extend(whole[:3])
            resumed = await generate(rpc.DecodeStub(cb), req)
            assert tokens(resumed) == whole[3:]
            assert b.worker.metrics.value("kvstore_blocks_fetched_total") == 5
            assert resumed[-1].usage.cached_prompt_tokens == 20
            await wait_idle(a)
            await wait_idle(b)
    finally:
        for client in clients:
            await client.close()
        await store_server.stop(None)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("resume", "extra", "needle"),
    [
        ([5, 128], {}, "resume token ids must be in"),
        ([5] * N, {}, "leave nothing to generate"),
        ([5] * 3, {"kv": pb.KVHandle(prefill_address="x:1", num_tokens=22)}, "can't come with kv"),
    ],
)
async def test_bad_resumes_are_invalid_argument(resume, extra, needle):
    async with (
        running(serve_decode(tiny_engine())) as dec,
        aio_channel(dec.address) as channel,
    ):
        req = pb.DecodeRequest(
            prompt_token_ids=P, sampling=GREEDY, resume_token_ids=resume, first_token_id=1, **extra
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await generate(rpc.DecodeStub(channel), req)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert needle in info.value.details()
        await wait_idle(dec)


@pytest.mark.asyncio
async def test_get_load_reports_the_capacity_admission_control_needs():
    async with (
        running(serve_decode(tiny_engine(num_blocks=40, max_num_seqs=3))) as dec,
        aio_channel(dec.address) as channel,
    ):
        load = await rpc.DecodeStub(channel).GetLoad(pb.LoadRequest(), timeout=5)
        assert (load.max_num_seqs, load.num_total_blocks) == (3, 40)
        engine = dec.worker.engine
        assert load.max_waiting_requests == engine.max_waiting_requests > 0
        assert load.max_queued_tokens == engine.max_queued_tokens > 0


@pytest.mark.asyncio
async def test_a_decode_past_its_deadline_is_aborted_and_gives_its_blocks_back():
    async with (
        running(serve_decode(tiny_engine(), role="colocated")) as dec,
        aio_channel(dec.address) as channel,
    ):
        stalled = stall(dec)
        req = pb.DecodeRequest(request_id="late", prompt_token_ids=P, sampling=GREEDY)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await generate(rpc.DecodeStub(channel), req, timeout=0.3)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await stalled
        await wait_idle(dec)  # the request was added behind the stall, then aborted
        assert dec.worker.metrics.value("requests_total", outcome="error") == 0
        # and the worker serves on
        assert tokens(await generate(rpc.DecodeStub(channel), req)) == reference(GREEDY)


@pytest.mark.asyncio
async def test_a_prefill_past_its_deadline_holds_no_lease_and_no_blocks():
    async with (
        running(serve_prefill(tiny_engine())) as pre,
        aio_channel(pre.address) as channel,
    ):
        stalled = stall(pre)
        req = pb.PrefillRequest(request_id="late", prompt_token_ids=P, sampling=GREEDY)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await rpc.PrefillStub(channel).Prefill(req, timeout=0.3)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await stalled
        await wait_idle(pre)
        assert len(pre.servicer.leases) == 0 and pre.servicer.leases.num_bytes == 0
