"""The Prefill servicer in this process on tiny engines: leases, chunks, errors, the kvstore."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import pytest
import torch
from workers_util import aio_channel, prompt, running, serve_prefill, tiny_engine

from splitserve.engine.sampling_params import SamplingParams
from splitserve.kvstore.backends import MemoryBackend
from splitserve.kvstore.service import KVStoreServicer
from splitserve.prefill.leases import LeaseCapacityError, LeaseTable
from splitserve.prefill.service import prefill_params
from splitserve.v1 import pb, rpc
from splitserve.wire.kv_codec import KVAssembler, TransferHeader
from splitserve.workers.kvstore_client import KVStoreClient

GREEDY = pb.SamplingOptions(max_tokens=8, temperature=0)


def reference_kv(p: list[int]) -> tuple[int, torch.Tensor]:
    engine = tiny_engine()
    engine.add_request("ref", p, SamplingParams(max_tokens=1, temperature=0), export_kv=True)
    final = next(o for _ in range(20) for o in engine.step() if o.finished)
    return final.new_token_ids[0], final.kv.data


async def pull(stub: rpc.PrefillStub, lease_id: str) -> list[pb.KVChunk]:
    return [c async for c in stub.PullKV(pb.PullKVRequest(lease_id=lease_id), timeout=10)]


def assemble(chunks: list[pb.KVChunk], pool_shape: tuple[int, ...]) -> torch.Tensor:
    h = chunks[0].header
    header = TransferHeader(h.dtype, tuple(h.shape), h.num_tokens, h.total_bytes, h.crc32)
    asm = KVAssembler(header, torch.float32, pool_shape)
    for c in chunks:
        asm.add(c.offset, c.data)
    return asm.finish()


@pytest.mark.asyncio
async def test_prefill_then_pull_streams_the_kv_in_chunks_and_ends_the_lease():
    p = prompt(22)
    first, kv = reference_kv(p)
    async with (
        running(serve_prefill(tiny_engine(), chunk_bytes=1024)) as served,
        aio_channel(served.address) as channel,
    ):
        stub = rpc.PrefillStub(channel)
        resp = await stub.Prefill(
            pb.PrefillRequest(request_id="r1", prompt_token_ids=p, sampling=GREEDY), timeout=10
        )
        assert resp.first_token_id == first and not resp.finished
        assert resp.kv.prefill_address == served.address and resp.kv.num_tokens == 22
        assert resp.kv.num_bytes == kv.numel() * 4 and resp.kv.lease_ms == 30_000
        chunks = await pull(stub, resp.kv.lease_id)
        assert len(chunks) == -(-resp.kv.num_bytes // 1024)
        assert chunks[0].HasField("header") and not any(c.HasField("header") for c in chunks[1:])
        assert all(len(c.data) <= 1024 for c in chunks)
        pool = served.worker.engine.engine.runner.kv_layout
        assert torch.equal(assemble(chunks, pool), kv)
        # the lease ended with the stream: a second pull finds nothing
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pull(stub, resp.kv.lease_id)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert len(served.servicer.leases) == 0
        assert served.worker.metrics.value("kv_lease_bytes") == 0
        assert served.worker.metrics.value("kv_transfer_bytes_total", direction="sent") == (
            resp.kv.num_bytes
        )
        bm = served.worker.engine.engine.block_manager
        assert bm.num_free_blocks == bm.num_blocks  # the prompt's blocks stay only as cache


@pytest.mark.parametrize(
    ("req", "needle"),
    [
        (pb.PrefillRequest(prompt_token_ids=[]), "empty"),
        (pb.PrefillRequest(prompt_token_ids=prompt(130)), "limit"),  # the pool holds 128 tokens
        (pb.PrefillRequest(prompt_token_ids=[5, 999]), "token ids"),
        (
            pb.PrefillRequest(prompt_token_ids=[5], sampling=pb.SamplingOptions(temperature=-1.0)),
            "temperature",
        ),
        (pb.PrefillRequest(prompt_token_ids=[5], sampling=pb.SamplingOptions(top_p=0)), "top_p"),
        (
            pb.PrefillRequest(prompt_token_ids=[5], sampling=pb.SamplingOptions(max_tokens=0)),
            "max_tokens",
        ),
    ],
)
@pytest.mark.asyncio
async def test_bad_requests_are_invalid_argument_and_the_worker_keeps_serving(req, needle):
    async with (
        running(serve_prefill(tiny_engine())) as served,
        aio_channel(served.address) as channel,
    ):
        stub = rpc.PrefillStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Prefill(req, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert needle in err.value.details()
        ok = await stub.Prefill(pb.PrefillRequest(prompt_token_ids=prompt(5)), timeout=10)
        assert ok.kv.lease_id


@pytest.mark.asyncio
async def test_full_lease_table_is_resource_exhausted_and_release_frees_it():
    engine = tiny_engine()
    one = 3 * 2 * 2 * 4 * 2 * 8 * 4  # 3 blocks: layers * K/V * block * kv_heads * head_dim * 4 B
    async with (
        running(serve_prefill(engine, max_lease_bytes=one)) as served,
        aio_channel(served.address) as channel,
    ):
        stub = rpc.PrefillStub(channel)
        first = await stub.Prefill(pb.PrefillRequest(prompt_token_ids=prompt(10)), timeout=10)
        assert first.kv.num_bytes == one
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Prefill(pb.PrefillRequest(prompt_token_ids=prompt(10, 1)), timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        released = await stub.ReleaseKV(pb.ReleaseKVRequest(lease_id=first.kv.lease_id))
        assert released.released
        assert not (await stub.ReleaseKV(pb.ReleaseKVRequest(lease_id=first.kv.lease_id))).released
        await stub.Prefill(pb.PrefillRequest(prompt_token_ids=prompt(10, 1)), timeout=10)


@pytest.mark.asyncio
async def test_unpulled_lease_expires_and_its_bytes_are_released():
    async with (
        running(serve_prefill(tiny_engine(), ttl_s=0.2, expire_interval_s=0.05)) as served,
        aio_channel(served.address) as channel,
    ):
        stub = rpc.PrefillStub(channel)
        resp = await stub.Prefill(pb.PrefillRequest(prompt_token_ids=prompt(10)), timeout=10)
        assert served.worker.metrics.value("kv_lease_bytes") == resp.kv.num_bytes
        await asyncio.sleep(0.5)
        assert served.worker.metrics.value("kv_lease_bytes") == 0
        assert served.worker.metrics.value("kv_leases_expired_total") == 1
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pull(stub, resp.kv.lease_id)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_lease_table_bookkeeping():
    now = [0.0]
    table = LeaseTable(max_bytes=100, ttl_s=5, clock=lambda: now[0])
    header = TransferHeader("float32", (1,), 1, 40, 0)
    with table.reserve(40) as r:
        lease = r.commit(header, b"x" * 40)
    with pytest.raises(LeaseCapacityError):
        table.reserve(61)
    with table.reserve(60):
        assert table.num_bytes == 100
    assert table.num_bytes == 40  # an unused reservation gives its bytes back
    assert table.begin_pull(lease.lease_id) is lease
    assert table.begin_pull(lease.lease_id) is None  # one puller only
    now[0] = 10
    assert table.expire() == 0  # never under a running pull
    assert table.release(lease.lease_id) and table.num_bytes == 0


@pytest.mark.asyncio
async def test_first_token_that_ends_the_request_gets_no_lease():
    async with (
        running(serve_prefill(tiny_engine())) as served,
        aio_channel(served.address) as channel,
    ):
        stub = rpc.PrefillStub(channel)
        one = pb.SamplingOptions(max_tokens=1, temperature=0, logprobs=2)
        resp = await stub.Prefill(
            pb.PrefillRequest(prompt_token_ids=prompt(6), sampling=one), timeout=10
        )
        assert resp.finished and resp.finish_reason == pb.FINISH_REASON_LENGTH
        assert not resp.HasField("kv") and len(served.servicer.leases) == 0
        assert len(resp.first_logprob.top) == 2 and resp.first_logprob.logprob <= 0


def test_prefill_params_keep_the_first_token_masking():
    params = SamplingParams(max_tokens=50, min_tokens=5, temperature=0.7, seed=3)
    first = prefill_params(params)
    assert first.max_tokens == 1 and first.min_tokens == 1  # EOS stays masked for token 1
    assert dataclasses.replace(first, max_tokens=50, min_tokens=5) == params


@pytest.mark.asyncio
async def test_prefix_blocks_flow_through_the_kvstore_between_workers():
    store_server = grpc.aio.server()
    rpc.add_KVStoreServicer_to_server(KVStoreServicer(MemoryBackend(1 << 26)), store_server)
    store_address = f"127.0.0.1:{store_server.add_insecure_port('127.0.0.1:0')}"
    await store_server.start()
    p = prompt(26)  # 6 full blocks of 4
    first, _ = reference_kv(p)
    req = pb.PrefillRequest(prompt_token_ids=p, sampling=GREEDY)
    clients = [KVStoreClient(store_address, timeout_s=5) for _ in range(2)]
    try:
        async with (
            running(serve_prefill(tiny_engine(), store=clients[0])) as a,
            running(serve_prefill(tiny_engine(), store=clients[1])) as b,
            aio_channel(a.address) as ca,
            aio_channel(b.address) as cb,
        ):
            ra = await rpc.PrefillStub(ca).Prefill(req, timeout=10)
            assert ra.num_cached_tokens == 0 and ra.first_token_id == first
            await wait_for(lambda: clients[0].counters.puts == 6)  # written back in background
            rb = await rpc.PrefillStub(cb).Prefill(req, timeout=10)
            assert rb.num_fetched_tokens == rb.num_cached_tokens == 24
            assert rb.first_token_id == first
            assert b.worker.metrics.value("kvstore_blocks_fetched_total") == 6
            # another tenant's salt starts another chain: nothing is shared
            salted = pb.PrefillRequest(prompt_token_ids=p, sampling=GREEDY, cache_salt="other")
            rs = await rpc.PrefillStub(cb).Prefill(salted, timeout=10)
            assert rs.num_cached_tokens == 0 and rs.first_token_id == first
    finally:
        for client in clients:
            await client.close()
        await store_server.stop(None)


async def wait_for(condition, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


class CorruptStore:
    """Claims every block and returns garbage: every payload must be rejected as a miss."""

    def __init__(self) -> None:
        self.puts = 0

    async def match(self, keys):
        return len(keys)

    async def get(self, keys):
        return [b"SSKV-not-really" for _ in keys]

    def put_background(self, items):
        self.puts += len(items)
        return True


@pytest.mark.asyncio
async def test_corrupt_kvstore_payloads_are_misses_not_wrong_answers():
    p = prompt(18)
    first, _ = reference_kv(p)
    store = CorruptStore()
    async with (
        running(serve_prefill(tiny_engine(), store=store)) as served,
        aio_channel(served.address) as channel,
    ):
        resp = await rpc.PrefillStub(channel).Prefill(
            pb.PrefillRequest(prompt_token_ids=p, sampling=GREEDY), timeout=10
        )
    assert resp.first_token_id == first and resp.num_fetched_tokens == 0
    assert store.puts == 0  # match said the store has every block: nothing to write back


@pytest.mark.asyncio
async def test_get_load_reports_the_engine():
    async with (
        running(serve_prefill(tiny_engine())) as served,
        aio_channel(served.address) as channel,
    ):
        load = await rpc.PrefillStub(channel).GetLoad(pb.LoadRequest(), timeout=5)
    assert load.role == "prefill" and load.worker_id == "prefill-test"
    assert load.block_size == 4 and load.num_free_blocks == 32 and load.num_running == 0
