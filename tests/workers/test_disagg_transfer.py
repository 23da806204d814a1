"""Prefill and decode as real processes on the real default model, driven over gRPC.

Three workers start once for the module (their model loads overlap): a prefill worker, a decode
worker and a colocated worker. Greedy tokens through prefill -> KV transfer -> decode must equal
the in-process engine's, and so must the colocated path and the fallback when the prefill
worker is gone. A 600-token prompt's KV (~28 MB in fp32) really crosses in <= 4 MiB chunks.
"""

from __future__ import annotations

import signal
import tempfile
import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ports import free_port
from prometheus_client.parser import text_string_to_metric_families
from workers_util import WorkerProcess, health_status, tokens

from splitserve.engine.config import EngineConfig
from splitserve.engine.engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.executors.build import create_engine
from splitserve.services.server import CHANNEL_OPTIONS
from splitserve.v1 import pb, rpc
from splitserve.wire import kv_shm
from splitserve.wire.kv_codec import CHUNK_BYTES, KVAssembler, TransferHeader
from splitserve.workers.metrics import PREFIX

pytestmark = pytest.mark.slow

NEW_TOKENS = 16
LEASE_TTL_S = 4
ENGINE_FLAGS = ["--kv-cache-mib", "64", "--threads", "1", "--log-level", "WARNING"]
GREEDY = pb.SamplingOptions(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
RPC_TIMEOUT = 300


@pytest.fixture(scope="module")
def workers() -> Iterator[dict[str, WorkerProcess]]:
    logs = tempfile.mkdtemp(prefix="splitserve-workers-")
    procs = {
        "prefill": WorkerProcess(
            "prefill",
            [*ENGINE_FLAGS, "--worker-id", "prefill-0", "--lease-ttl-s", str(LEASE_TTL_S)],
        ),
        "decode": WorkerProcess("decode", [*ENGINE_FLAGS, "--role", "decode"]),
        "colocated": WorkerProcess("decode", [*ENGINE_FLAGS, "--role", "colocated"]),
    }
    for name in ("prefill", "decode"):
        procs[name].metrics_port = free_port()
        procs[name].args += ["--metrics-port", str(procs[name].metrics_port)]
    try:
        for p in procs.values():
            p.start(logs)
        for p in procs.values():
            p.wait_serving()
        yield procs
    finally:
        for p in procs.values():
            p.stop()


@pytest.fixture(scope="module")
def reference(smollm2_checkpoint) -> LLMEngine:
    return create_engine(EngineConfig(kv_cache_memory_bytes=64 << 20), smollm2_checkpoint)


@pytest.fixture(scope="module")
def chat_prompt(smollm2_checkpoint) -> list[int]:
    tok = smollm2_checkpoint.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    return tok.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def expected(reference, chat_prompt) -> list[int]:
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    return reference.generate([chat_prompt], params)[0].new_token_ids


def channel(worker: WorkerProcess) -> grpc.Channel:
    return grpc.insecure_channel(worker.address, options=CHANNEL_OPTIONS)


def generate(worker: WorkerProcess, req: pb.DecodeRequest) -> list[pb.DecodeResponse]:
    with channel(worker) as ch:
        return list(rpc.DecodeStub(ch).Generate(req, timeout=RPC_TIMEOUT))


def prefill(worker: WorkerProcess, prompt: list[int], sampling=GREEDY) -> pb.PrefillResponse:
    with channel(worker) as ch:
        req = pb.PrefillRequest(prompt_token_ids=prompt, sampling=sampling)
        return rpc.PrefillStub(ch).Prefill(req, timeout=RPC_TIMEOUT)


def decode_with_kv(prompt: list[int], first: pb.PrefillResponse, sampling=GREEDY):
    return pb.DecodeRequest(
        prompt_token_ids=prompt, sampling=sampling, kv=first.kv, first_token_id=first.first_token_id
    )


def metric(worker: WorkerProcess, name: str, **labels: str) -> float:
    url = f"http://127.0.0.1:{worker.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == PREFIX + name and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                return sample.value
    return 0.0


def test_disaggregated_equals_the_in_process_engine(workers, chat_prompt, expected):
    first = prefill(workers["prefill"], chat_prompt)
    assert first.kv.num_tokens == len(chat_prompt) and first.first_token_id == expected[0]
    responses = generate(workers["decode"], decode_with_kv(chat_prompt, first))
    assert tokens(responses) == expected
    last = responses[-1]
    assert last.finish_reason == pb.FINISH_REASON_LENGTH
    assert last.usage.completion_tokens == NEW_TOKENS
    assert metric(workers["decode"], "kv_transfer_fallbacks_total") == 0


def test_colocated_equals_the_in_process_engine(workers, chat_prompt, expected):
    req = pb.DecodeRequest(prompt_token_ids=chat_prompt, sampling=GREEDY)
    assert tokens(generate(workers["colocated"], req)) == expected


def test_dead_prefill_address_falls_back_to_local_prefill(workers, chat_prompt, expected):
    gone = pb.PrefillResponse(
        first_token_id=expected[0],
        kv=pb.KVHandle(
            prefill_address=f"127.0.0.1:{free_port()}",
            lease_id="nobody-home",
            num_tokens=len(chat_prompt),
        ),
    )
    before = metric(workers["decode"], "kv_transfer_fallbacks_total")
    assert tokens(generate(workers["decode"], decode_with_kv(chat_prompt, gone))) == expected
    assert metric(workers["decode"], "kv_transfer_fallbacks_total") == before + 1


def test_bad_inputs_are_invalid_argument_and_workers_keep_serving(workers, chat_prompt):
    with channel(workers["prefill"]) as ch, pytest.raises(grpc.RpcError) as err:
        rpc.PrefillStub(ch).Prefill(pb.PrefillRequest(prompt_token_ids=[]), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad = pb.DecodeRequest(prompt_token_ids=[1, 10**6], sampling=GREEDY)
    with pytest.raises(grpc.RpcError) as err:
        generate(workers["decode"], bad)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    one = pb.SamplingOptions(max_tokens=1, temperature=0)
    assert prefill(workers["prefill"], chat_prompt, one).finished  # still serving


def test_large_prompt_kv_is_chunked_and_decodes_the_same(workers):
    prompt = [(i * 37) % 40000 + 100 for i in range(600)]
    few = pb.SamplingOptions(max_tokens=4, temperature=0, ignore_eos=True)
    # pull it ourselves, as a decode worker would, to see the chunks
    first = prefill(workers["prefill"], prompt, few)
    assert first.kv.num_bytes > 6 * CHUNK_BYTES
    with channel(workers["prefill"]) as ch:
        chunks = list(rpc.PrefillStub(ch).PullKV(pb.PullKVRequest(lease_id=first.kv.lease_id)))
    assert len(chunks) == -(-first.kv.num_bytes // CHUNK_BYTES)
    assert all(len(c.data) <= CHUNK_BYTES for c in chunks)
    assert chunks[0].HasField("header") and not any(c.HasField("header") for c in chunks[1:])
    h = chunks[0].header
    header = TransferHeader(h.dtype, tuple(h.shape), h.num_tokens, h.total_bytes, h.crc32)
    asm = KVAssembler(header, torch.float32, (30, 2, 64, 16, 3, 64))
    for c in chunks:
        asm.add(c.offset, c.data)
    assert asm.finish().shape == (30, 2, 38, 16, 3, 64)  # checksum verified

    # the whole path: the second prefill hits its local prefix cache
    again = prefill(workers["prefill"], prompt, few)
    assert again.num_cached_tokens == 592
    received = metric(workers["decode"], "kv_transfer_bytes_total", direction="received")
    via_shm = metric(workers["decode"], "kv_transfer_shm_bytes_total", direction="received")
    disagg = tokens(generate(workers["decode"], decode_with_kv(prompt, again, few)))
    after = metric(workers["decode"], "kv_transfer_bytes_total", direction="received")
    assert after - received == again.kv.num_bytes
    # same host: every byte went through the decode worker's shared-memory file
    shm_after = metric(workers["decode"], "kv_transfer_shm_bytes_total", direction="received")
    assert shm_after - via_shm == again.kv.num_bytes
    local = tokens(
        generate(workers["decode"], pb.DecodeRequest(prompt_token_ids=prompt, sampling=few))
    )
    assert disagg == local and disagg[0] == again.first_token_id


def test_a_pull_naming_a_shared_file_gets_notices_and_the_same_bytes(workers, chat_prompt):
    """PullKV with a file made in /dev/shm: the sender writes the KV there and streams only
    where it lies; a name it can't open (another host's) gets the bytes streamed instead."""
    first = prefill(workers["prefill"], chat_prompt)
    second = prefill(workers["prefill"], chat_prompt)
    n = first.kv.num_bytes
    with channel(workers["prefill"]) as ch, kv_shm.Segment.create(kv_shm.DEFAULT_DIR, n) as seg:
        stub = rpc.PrefillStub(ch)
        notices = list(stub.PullKV(pb.PullKVRequest(lease_id=first.kv.lease_id, shm_name=seg.name)))
        assert notices and not any(c.data for c in notices)
        assert sum(c.shm_length for c in notices) == n
        h = notices[0].header
        header = TransferHeader(h.dtype, tuple(h.shape), h.num_tokens, h.total_bytes, h.crc32)
        asm = KVAssembler(header, torch.float32, (30, 2, 64, 16, 3, 64), segment=seg)
        for c in notices:
            asm.add_written(c.offset, c.shm_length)
        via_file = asm.finish().clone()  # checksum verified
        del asm
        elsewhere = f"{kv_shm.PREFIX}1-{'c' * 32}"  # no such file on the sender's host
        request = pb.PullKVRequest(lease_id=second.kv.lease_id, shm_name=elsewhere)
        chunks = list(stub.PullKV(request))
    assert not any(c.shm_length for c in chunks) and sum(len(c.data) for c in chunks) == n
    asm = KVAssembler(header, torch.float32, (30, 2, 64, 16, 3, 64))
    for c in chunks:
        asm.add(c.offset, c.data)
    assert torch.equal(asm.finish(), via_file)


def test_unpulled_lease_expires_and_releases_its_bytes(workers, chat_prompt):
    expired = metric(workers["prefill"], "kv_leases_expired_total")
    first = prefill(workers["prefill"], chat_prompt)
    assert metric(workers["prefill"], "kv_lease_bytes") >= first.kv.num_bytes
    time.sleep(LEASE_TTL_S + 2)
    assert metric(workers["prefill"], "kv_lease_bytes") == 0
    assert metric(workers["prefill"], "kv_leases_expired_total") == expired + 1
    with channel(workers["prefill"]) as ch, pytest.raises(grpc.RpcError) as err:
        list(rpc.PrefillStub(ch).PullKV(pb.PullKVRequest(lease_id=first.kv.lease_id)))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_sigterm_reports_not_serving_drains_and_exits_0(workers, chat_prompt, expected):
    worker = workers["colocated"]
    with channel(worker) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        stream = rpc.DecodeStub(ch).Generate(
            pb.DecodeRequest(prompt_token_ids=chat_prompt, sampling=GREEDY), timeout=RPC_TIMEOUT
        )
        got = list(next(stream).token_ids)  # in flight
        worker.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while health_status(health) != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline, "never reported NOT_SERVING"
            time.sleep(0.05)
        got += tokens(list(stream))  # the in-flight request still completes
    assert got == expected
    assert worker.proc.wait(60) == 0
