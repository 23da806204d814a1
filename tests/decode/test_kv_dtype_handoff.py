"""A low-precision KV cache across workers: the prefill -> decode hand-off and the kvstore carry
KV in the pool's own packed format, and a worker with another KV dtype refuses it (and
recomputes) instead of reading its bytes as its own."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
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
N = 8
GREEDY = pb.SamplingOptions(max_tokens=N, temperature=0, ignore_eos=True)


def expected(kv: str) -> list[int]:
    params = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)
    return tiny_engine(kv_cache_dtype=kv).generate([P], params)[0].new_token_ids


async def disaggregated(pre_kv: str, dec_kv: str):
    async with (
        running(serve_prefill(tiny_engine(kv_cache_dtype=pre_kv), chunk_bytes=512)) as pre,
        running(serve_decode(tiny_engine(kv_cache_dtype=dec_kv))) as dec,
        aio_channel(pre.address) as pc,
        aio_channel(dec.address) as dc,
    ):
        req = pb.PrefillRequest(prompt_token_ids=P, sampling=GREEDY)
        first = await rpc.PrefillStub(pc).Prefill(req, timeout=10)
        decode_req = pb.DecodeRequest(
            request_id="d1",
            prompt_token_ids=P,
            sampling=GREEDY,
            kv=first.kv,
            first_token_id=first.first_token_id,
        )
        out = [r async for r in rpc.DecodeStub(dc).Generate(decode_req, timeout=30)]
        metrics = dec.worker.metrics
        received = metrics.value("kv_transfer_bytes_total", direction="received")
        fallbacks = metrics.value("kv_transfer_fallbacks_total")
        assert_idle(dec)
        return first, tokens(out), received, fallbacks


@pytest.mark.asyncio
@pytest.mark.parametrize("kv", ["int8", "fp8_e4m3"])
async def test_packed_kv_moves_in_its_own_format_and_decodes_as_one_engine(kv):
    first, out, received, fallbacks = await disaggregated(kv, kv)
    assert out == expected(kv)
    # 6 blocks x 2 layers x (K, V) x 4 tokens x 2 KV heads x (8 values + a 2-byte scale)
    assert first.kv.num_bytes == received == 6 * 2 * 2 * 4 * 2 * 10
    assert fallbacks == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("pre_kv,dec_kv", [("auto", "int8"), ("int8", "fp8_e4m3")])
async def test_kv_of_another_kv_dtype_is_refused_by_name_and_recomputed(pre_kv, dec_kv, caplog):
    """int8 and fp8 pools are both bytes of the same shape: only the format's name tells
    them apart, and it is checked before a byte is read."""
    with caplog.at_level(logging.WARNING, logger="splitserve"):
        _, out, received, fallbacks = await disaggregated(pre_kv, dec_kv)
    assert out == expected(dec_kv)
    assert received == 0 and fallbacks == 1
    refusal = [r.getMessage() for r in caplog.records if "unusable" in r.getMessage()]
    assert len(refusal) == 1 and f"--kv-cache-dtype {dec_kv}" in refusal[0]
    assert f"--kv-cache-dtype {pre_kv}" in refusal[0]


@pytest.mark.asyncio
async def test_int8_blocks_go_through_the_kvstore_and_only_int8_workers_use_them():
    store_server = grpc.aio.server()
    rpc.add_KVStoreServicer_to_server(KVStoreServicer(MemoryBackend(1 << 26)), store_server)
    store_address = f"127.0.0.1:{store_server.add_insecure_port('127.0.0.1:0')}"
    await store_server.start()
    clients = [KVStoreClient(store_address, timeout_s=5) for _ in range(3)]
    req = pb.DecodeRequest(prompt_token_ids=P, sampling=GREEDY)

    def worker(i: int, kv: str):
        return running(
            serve_decode(tiny_engine(kv_cache_dtype=kv), store=clients[i], role="colocated")
        )

    try:
        async with worker(0, "int8") as a, worker(1, "int8") as b, worker(2, "auto") as c:

            async def ask(w) -> list[pb.DecodeResponse]:
                async with aio_channel(w.address) as channel:
                    return [r async for r in rpc.DecodeStub(channel).Generate(req, timeout=30)]

            first = await ask(a)
            assert tokens(first) == expected("int8")
            for _ in range(500):  # written back in the background once the request finished
                if clients[0].counters.puts == 5:
                    break
                await asyncio.sleep(0.02)
            second = await ask(b)
            assert tokens(second) == expected("int8")
            assert second[-1].usage.cached_prompt_tokens == 20
            assert b.worker.metrics.value("kvstore_blocks_fetched_total") == 5
            third = await ask(c)  # its keys are float32's: nothing to fetch, nothing misread
            assert tokens(third) == expected("auto")
            assert third[-1].usage.cached_prompt_tokens == 0
            assert c.worker.metrics.value("kvstore_blocks_fetched_total") == 0
            for w in (a, b, c):
                assert_idle(w)
    finally:
        for client in clients:
            await client.close()
        await store_server.stop(None)
