"""Property-based fuzzing of the internal RPCs' messages (hypothesis, bounded for CI).

Whatever a peer on the internal plane sends, the receiver answers with its own clean error and
keeps serving:

- KVStore Match / Get / Put with arbitrary keys and payload bytes (random, truncated, mutated,
  hostile headers), against real in-process kvstore gRPC servers, with and without the mesh
  secret: every answer is OK or INVALID_ARGUMENT, exactly as the request's validity predicts,
  nothing is logged as an error, and the server still stores and serves afterwards.
- KV transfer headers and chunks as a decode worker receives them (decode/service.py's header
  check and wire/kv_codec.py's KVAssembler), and as a pipeline stage receives them: only
  TransferError / KVCodecError, and a buffer is only ever allocated at the size the receiver
  itself expects, never at a size the sender declared. Then the same through a real decode
  worker pulling from a prefill server that sends fuzzed chunks: every request is still
  answered with the engine's tokens or its recomputation, and no KV block leaks.
- A pipeline stage's frames (StageTensor hidden states, the StepWire bytes): the parsers raise
  only ValueError, and a real stage process answers OK or INVALID_ARGUMENT, never INTERNAL.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import CHECKPOINT_TINY_HF
from workers_util import prompt, serve_decode, tiny_engine

from splitserve.decode.service import TransferError, _assembler
from splitserve.engine.sampling_params import SamplingParams
from splitserve.kvstore.backends import MemoryBackend
from splitserve.kvstore.service import KVStoreServicer, Limits
from splitserve.services.server import CHANNEL_OPTIONS
from splitserve.v1 import pb, rpc
from splitserve.wire import kv_payload
from splitserve.wire.kv_codec import KVAssembler, KVCodecError, TransferHeader, tensor_bytes
from splitserve.wire.pipeline_codec import (
    ACTIVATION_DTYPES,
    bytes_wire,
    kv_assembler,
    message_tensor,
    tensor_message,
    wire_bytes,
)
from splitserve.wire.step_wire import StepWire

T = TypeVar("T")
FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
SECRET = b"fuzzing-mesh-secret-0123456789"
LIMITS = Limits(max_keys=16, max_key_bytes=64, max_payload_bytes=4096)
OK, INVALID = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT


class LoopThread:
    """An event loop on a thread of its own, for grpc.aio servers a sync test talks to."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


def no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


# ---- KVStore ------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["unsigned", "signed"])
def kvstore(request, loop_thread: LoopThread) -> Iterator[tuple[rpc.KVStoreStub, bytes | None]]:
    """A real kvstore gRPC server (memory backend) in this process; with the mesh secret or not."""
    secret = SECRET if request.param == "signed" else None

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(options=CHANNEL_OPTIONS)
        servicer = KVStoreServicer(MemoryBackend(64 << 20), LIMITS, secret)
        rpc.add_KVStoreServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = loop_thread.run(start())
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
    yield rpc.KVStoreStub(channel), secret
    channel.close()
    loop_thread.run(server.stop(None))


keys_st = st.one_of(
    st.binary(min_size=32, max_size=32),  # what real keys look like
    st.binary(min_size=0, max_size=80),  # empty, short, over the limit
)


@st.composite
def sound_payloads(draw, key: bytes, secret: bytes | None) -> bytes:
    dtype = draw(st.sampled_from(sorted(kv_payload.DTYPE_CODES)))
    shape = draw(st.lists(st.integers(0, 5), max_size=3))
    size = kv_payload.ITEMSIZE[dtype]
    for s in shape:
        size *= s
    data = draw(st.binary(min_size=size, max_size=size))
    return kv_payload.encode_payload(key, dtype, shape, data, secret)


@st.composite
def payloads(draw, key: bytes) -> bytes:
    """Random bytes, or a real payload (signed or not, for this key or another) cut short,
    extended, bit-flipped, or with a hostile header (huge ndim/shape/key length, odd version)."""
    secret = draw(st.sampled_from([None, SECRET, b"another-secret-entirely-x"]))
    the_key = draw(st.one_of(st.just(key), keys_st)) if key else b"k"
    valid = draw(sound_payloads(the_key, secret))
    kind = draw(st.sampled_from(["valid", "random", "cut", "extended", "flipped", "hostile"]))
    if kind == "valid":
        return valid
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "cut":
        return valid[: draw(st.integers(0, len(valid)))]
    if kind == "extended":
        return valid + draw(st.binary(min_size=1, max_size=16))
    if kind == "flipped":
        out = bytearray(valid)
        for _ in range(draw(st.integers(1, 3))):
            out[draw(st.integers(0, len(out) - 1))] ^= draw(st.integers(1, 255))
        return bytes(out)
    ndim = draw(st.integers(0, 255))
    head = struct.pack(
        "<4sBBB", draw(st.sampled_from([b"SSKV", b"SSKX"])), draw(st.integers(0, 255)),
        draw(st.integers(0, 255)), ndim,
    )  # fmt: skip
    dims = draw(st.lists(st.integers(0, 2**32 - 1), min_size=0, max_size=ndim))
    body = struct.pack(f"<{len(dims)}I", *dims) + struct.pack("<H", draw(st.integers(0, 0xFFFF)))
    return head + body + draw(st.binary(max_size=64))


def rpc_code(call) -> tuple[grpc.StatusCode, Any]:
    try:
        return OK, call()
    except grpc.RpcError as e:
        return e.code(), e.details()


def keys_valid(keys: list[bytes]) -> bool:
    return len(keys) <= LIMITS.max_keys and all(0 < len(k) <= LIMITS.max_key_bytes for k in keys)


def test_kvstore_match_and_get_fuzz(kvstore, caplog: pytest.LogCaptureFixture) -> None:
    stub, secret = kvstore
    seen: set[grpc.StatusCode] = set()

    @FUZZ
    @given(keys=st.lists(keys_st, max_size=20))
    def run(keys: list[bytes]) -> None:
        code, result = rpc_code(lambda: stub.Match(pb.MatchRequest(keys=keys), timeout=10))
        seen.add(code)
        assert code == (OK if keys_valid(keys) else INVALID), (code, result)
        code, result = rpc_code(lambda: list(stub.Get(pb.GetRequest(keys=keys), timeout=10)))
        assert code == (OK if keys_valid(keys) else INVALID), (code, result)
        if code == OK:
            assert [b.key for b in result] == keys
            for b in result:  # whatever comes back is a sound payload for its key
                assert b.missing or kv_payload.is_valid_payload(b.payload, b.key, secret)

    run()
    assert seen == {OK, INVALID}
    assert_kvstore_serves(stub, secret)
    no_errors_logged(caplog)


@st.composite
def put_blocks(draw, secret: bytes | None) -> list[pb.BlockPayload]:
    """Sound blocks (as a worker of this mesh writes them), with at most one spoiled: a fuzzed
    key or payload, or marked missing. Sometimes more blocks than a Put may carry."""
    n = draw(st.one_of(st.integers(1, 8), st.integers(0, 20)))
    blocks = []
    for _ in range(n):
        key = draw(st.binary(min_size=32, max_size=32))
        blocks.append(pb.BlockPayload(key=key, payload=draw(sound_payloads(key, secret))))
    if blocks and draw(st.booleans()):
        i = draw(st.integers(0, n - 1))
        key = draw(keys_st)
        missing = draw(st.integers(0, 9)) == 0
        blocks[i] = pb.BlockPayload(key=key, payload=draw(payloads(key)), missing=missing)
    return blocks


def block_valid(block: pb.BlockPayload, secret: bytes | None) -> bool:
    return (
        not block.missing
        and 0 < len(block.key) <= LIMITS.max_key_bytes
        and len(block.payload) <= LIMITS.max_payload_bytes
        and kv_payload.is_valid_payload(block.payload, block.key, secret)
    )


def test_kvstore_put_fuzz(kvstore, caplog: pytest.LogCaptureFixture) -> None:
    stub, secret = kvstore
    seen: dict[grpc.StatusCode, int] = {}

    @FUZZ
    @given(blocks=put_blocks(secret))
    def run(blocks: list[pb.BlockPayload]) -> None:
        code, result = rpc_code(lambda: stub.Put(iter(blocks), timeout=10))
        seen[code] = seen.get(code, 0) + (len(blocks) > 0)
        valid = len(blocks) <= LIMITS.max_keys and all(block_valid(b, secret) for b in blocks)
        assert code == (OK if valid else INVALID), (code, result)
        if valid:
            assert result.num_stored == len(blocks)
            keys = [b.key for b in blocks]
            assert stub.Match(pb.MatchRequest(keys=keys), timeout=10).num_matched == len(keys)

    run()
    assert seen.get(OK, 0) > 0 and seen.get(INVALID, 0) > 0, seen  # both, with blocks
    assert_kvstore_serves(stub, secret)
    no_errors_logged(caplog)


def assert_kvstore_serves(stub: rpc.KVStoreStub, secret: bytes | None) -> None:
    key = os.urandom(32)
    value = kv_payload.encode_payload(key, "uint8", (4,), b"abcd", secret)
    assert stub.Put(iter([pb.BlockPayload(key=key, payload=value)]), timeout=10).num_stored == 1
    (got,) = list(stub.Get(pb.GetRequest(keys=[key]), timeout=10))
    assert got.payload == value


# ---- KV transfer headers and chunks -------------------------------------------------------------
POOL = (2, 2, 32, 4, 2, 8)  # layers, k/v, blocks, block size, kv heads, head dim (tiny_engine)
NUM_TOKENS = 22
EXPECTED = (2, 2, 6, 4, 2, 8)  # the reservation for 22 tokens: 6 blocks
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


def mutated(values: tuple[int, ...]) -> st.SearchStrategy[list[int]]:
    """The expected shape, with one field changed, or anything at all."""
    return st.one_of(
        st.just(list(values)),
        st.tuples(st.integers(0, len(values) - 1), u32).map(
            lambda iv: [iv[1] if i == iv[0] else v for i, v in enumerate(values)]
        ),
        st.lists(u32, max_size=8),
    )


@st.composite
def transfers(draw, expected: tuple[int, ...]) -> tuple[pb.KVHeader, list[tuple[int, bytes]]]:
    """A sound transfer of `expected`, with some of its parts (header fields, chunk order,
    offsets, sizes) made hostile."""
    spoil = draw(
        st.sets(st.sampled_from(["dtype", "shape", "tokens", "total", "crc", "chunks"]), max_size=3)
    )
    nbytes = 4
    for s in expected:
        nbytes *= s
    data = random.Random(draw(st.integers(0, 2**32))).randbytes(nbytes)  # cheap to draw
    header = pb.KVHeader(
        dtype=draw(st.sampled_from(["bfloat16", "int8", "", "float64", "Float32"]))
        if "dtype" in spoil
        else "float32",
        shape=draw(mutated(expected)) if "shape" in spoil else list(expected),
        num_tokens=draw(u32) if "tokens" in spoil else NUM_TOKENS,
        total_bytes=draw(u64) if "total" in spoil else nbytes,
        crc32=draw(u32) if "crc" in spoil else zlib.crc32(data),
    )
    step = draw(st.sampled_from([nbytes, 1000, 4096, 777]))
    chunks = [(off, data[off : off + step]) for off in range(0, nbytes, step)]
    how = draw(st.sampled_from(["drop", "swap", "offset", "grow"])) if "chunks" in spoil else ""
    if how == "drop":
        del chunks[draw(st.integers(0, len(chunks) - 1))]
    elif how == "swap" and len(chunks) > 1:
        chunks[0], chunks[-1] = chunks[-1], chunks[0]
    elif how == "offset":
        i = draw(st.integers(0, len(chunks) - 1))
        chunks[i] = (draw(u64), chunks[i][1])
    elif how == "grow":
        chunks.append((nbytes, draw(st.binary(min_size=1, max_size=64))))
    return header, chunks


def test_decode_kv_header_and_chunks_fuzz() -> None:
    nbytes = 4 * 2 * 2 * 6 * 4 * 2 * 8

    @FUZZ
    @given(transfer=transfers(EXPECTED))
    def run(transfer: tuple[pb.KVHeader, list[tuple[int, bytes]]]) -> None:
        header, chunks = transfer
        first = pb.KVChunk(header=header, offset=chunks[0][0] if chunks else 0)
        try:
            asm = _assembler(first, torch.float32, EXPECTED, NUM_TOKENS)
        except (TransferError, KVCodecError):
            return
        # Accepted: only ever at the size this worker expects, whatever the header said.
        assert len(asm._buf) == nbytes
        try:
            for offset, data in chunks:
                asm.add(offset, data)
            kv = asm.finish()
        except KVCodecError:
            return
        assert tuple(kv.shape) == EXPECTED and kv.dtype == torch.float32

    run()


def test_stage_kv_header_fuzz() -> None:
    pool_bytes = 4
    for s in POOL:
        pool_bytes *= s

    @FUZZ
    @given(transfer=transfers((2, 2, 3, 4, 2, 8)))
    def run(transfer: tuple[pb.KVHeader, list[tuple[int, bytes]]]) -> None:
        header, chunks = transfer
        try:
            asm = kv_assembler(header, torch.float32, POOL)
        except KVCodecError:
            return
        assert len(asm._buf) <= pool_bytes  # never more than the stage's own pool
        try:
            for offset, data in chunks:
                asm.add(offset, data)
            asm.finish()
        except KVCodecError:
            return

    run()


def test_kv_assembler_rejects_what_it_must() -> None:
    """The oracle above depends on these: a sound transfer assembles, a lying one does not."""
    kv = torch.randn(EXPECTED)
    data = tensor_bytes(kv)
    h = TransferHeader("float32", EXPECTED, NUM_TOKENS, len(data), zlib.crc32(data))
    asm = KVAssembler(h, torch.float32, POOL)
    asm.add(0, data)
    assert torch.equal(asm.finish(), kv)
    huge = TransferHeader("float32", (2, 2, 2**31, 4, 2, 8), NUM_TOKENS, 2**40, 0)
    with pytest.raises(KVCodecError):
        KVAssembler(huge, torch.float32, POOL)


class RoguePrefill(rpc.PrefillServicer):
    """Streams whatever chunks the test sets for PullKV."""

    def __init__(self) -> None:
        self.chunks: list[pb.KVChunk] = []
        self.released = 0

    async def PullKV(self, request, context):
        for chunk in self.chunks:
            yield chunk

    async def ReleaseKV(self, request, context):
        self.released += 1
        return pb.ReleaseKVResponse(released=True)


def test_decode_worker_pulling_fuzzed_chunks_answers_and_leaks_nothing(
    loop_thread: LoopThread,
) -> None:
    """A real decode worker whose KV pull is served fuzzed chunks: each request is answered,
    with the engine's tokens when the KV was refused, and its blocks come back."""
    p = prompt(NUM_TOKENS)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    ref = tiny_engine()
    ref.add_request("ref", p, SamplingParams(max_tokens=1, temperature=0), export_kv=True)
    final = next(o for _ in range(50) for o in ref.step() if o.finished)
    first_token, sound_kv = final.new_token_ids[0], final.kv.data
    expected = tiny_engine().generate([p], params)[0].new_token_ids
    rogue = RoguePrefill()

    async def start():
        server = grpc.aio.server(options=CHANNEL_OPTIONS)
        rpc.add_PrefillServicer_to_server(rogue, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, f"127.0.0.1:{port}", await serve_decode(tiny_engine())

    server, rogue_address, worker = loop_thread.run(start())
    channel = grpc.insecure_channel(worker.address, options=CHANNEL_OPTIONS)
    stub = rpc.DecodeStub(channel)
    sound = tensor_bytes(sound_kv)
    outcomes = {"adopted": 0, "recomputed": 0}

    @settings(FUZZ, max_examples=60)
    @given(transfer=transfers(EXPECTED), sound_data=st.booleans())
    def run(transfer, sound_data: bool) -> None:
        header, chunks = transfer
        if sound_data:
            chunks = [(0, sound)]  # the real KV, under a fuzzed header
            header.crc32 = zlib.crc32(sound)
        rogue.chunks = [pb.KVChunk(offset=o, data=d) for o, d in chunks]
        if rogue.chunks:
            rogue.chunks[0].header.CopyFrom(header)
        fallbacks = worker.worker.metrics.value("kv_transfer_fallbacks_total")
        req = pb.DecodeRequest(
            prompt_token_ids=p,
            sampling=pb.SamplingOptions(max_tokens=4, temperature=0, ignore_eos=True),
            kv=pb.KVHandle(prefill_address=rogue_address, lease_id="l", num_tokens=len(p)),
            first_token_id=first_token,
        )
        responses = list(stub.Generate(req, timeout=60))
        ids = [t for r in responses for t in r.token_ids]
        assert len(ids) == 4 and responses[-1].finish_reason == pb.FINISH_REASON_LENGTH
        if worker.worker.metrics.value("kv_transfer_fallbacks_total") > fallbacks:
            assert ids == expected  # refused: recomputed here, the engine's own answer
            outcomes["recomputed"] += 1
        else:
            outcomes["adopted"] += 1
            if sound_data:  # the real KV, adopted: the engine's answer too
                assert ids == expected
        bm = worker.worker.engine.engine.block_manager
        bm.check_integrity()
        assert bm.num_free_blocks == bm.num_blocks  # nothing leaked

    try:
        run()
        assert outcomes["recomputed"] > 0 and outcomes["adopted"] > 0, outcomes
    finally:
        channel.close()
        loop_thread.run(worker.stop())
        loop_thread.run(server.stop(None))


# ---- pipeline stage frames ----------------------------------------------------------------------
HIDDEN = CHECKPOINT_TINY_HF["hidden_size"]  # what tiny_model_dir holds
int64 = st.integers(-(2**63), 2**63 - 1)


@st.composite
def step_wires(draw, num_blocks: int = 64, block_size: int = 16) -> StepWire:
    """Mostly sound micro-batches of 1-3 sequences, each field possibly made hostile."""
    n = draw(st.integers(1, 3))
    num_new = [1] * draw(st.integers(0, n)) + [draw(st.integers(1, 5)) for _ in range(n)]
    num_new = num_new[:n]
    num_cached = [draw(st.integers(0, 40)) for _ in range(n)]
    tables = []
    for c, k in zip(num_cached, num_new, strict=True):
        need = -(-(c + k) // block_size)
        tables.append([draw(st.integers(0, num_blocks - 1)) for _ in range(need)])
    ids = [draw(st.integers(0, 1000)) for _ in range(sum(num_new))]
    pos = [p for c, k in zip(num_cached, num_new, strict=True) for p in range(c, c + k)]
    rows = sorted(draw(st.sets(st.integers(0, len(ids) - 1), min_size=1)))
    wire = StepWire(ids, pos, num_cached, num_new, tables, rows)
    field = draw(st.sampled_from(["none", "cached", "new", "table", "pos", "rows", "short"]))
    if field == "cached":
        wire.num_cached[draw(st.integers(0, n - 1))] = draw(int64)
    elif field == "new":
        wire.num_new[draw(st.integers(0, n - 1))] = draw(st.integers(-3, 8))
    elif field == "table":
        i = draw(st.integers(0, n - 1))
        wire.block_tables[i] = draw(st.lists(int64, max_size=4))
    elif field == "pos" and pos:
        wire.positions[draw(st.integers(0, len(pos) - 1))] = draw(int64)
    elif field == "rows":
        wire.sample_rows = draw(st.lists(int64, max_size=4))
    elif field == "short":
        wire.block_tables[draw(st.integers(0, n - 1))] = []
    return wire


@st.composite
def hidden_tensors(draw, rows: int) -> pb.StageTensor:
    dtype = draw(st.sampled_from(["float32", "float32", "bfloat16", "float16", "int8", "x", ""]))
    shape = draw(
        st.one_of(st.just([rows, HIDDEN]), st.lists(st.integers(0, 2**64 - 1), max_size=3))
    )
    size = rows * HIDDEN * {"bfloat16": 2, "float16": 2, "int8": 1}.get(dtype, 4)
    if draw(st.booleans()):
        size = draw(st.integers(0, size + 8))
    values = torch.randn(-(-size // 4) + 1).numpy().tobytes()[:size]
    return pb.StageTensor(dtype=dtype, shape=shape, data=values)


def test_stage_frame_parsers_fuzz() -> None:
    @FUZZ
    @given(data=st.binary(max_size=400), wire=step_wires(), rows=st.integers(0, 6), d=st.data())
    def run(data: bytes, wire: StepWire, rows: int, d) -> None:
        for raw in (data, wire_bytes(wire) if _fits_int64(wire) else b""):
            try:
                parsed = bytes_wire(raw)
            except ValueError:
                continue
            assert wire_bytes(parsed) == raw  # what parses is exactly what was sent
        msg = d.draw(hidden_tensors(rows))
        try:
            t = message_tensor(msg, (rows, HIDDEN))
        except ValueError:
            return
        assert msg.dtype in ACTIVATION_DTYPES and tuple(t.shape) == (rows, HIDDEN)

    run()


def _fits_int64(wire: StepWire) -> bool:
    try:
        wire.to_tensor()
    except (RuntimeError, OverflowError):
        return False
    return True


@pytest.fixture(scope="module")
def stage_address(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Stage 1 of 2 (the last) of the tiny checkpoint, as its own process."""
    folder = tmp_path_factory.mktemp("stage")
    port_file, log_path = folder / "port", folder / "stage.log"
    flags = (
        f"--stage-index 1 --pipeline-stages 2 --model {tiny_model_dir} --num-kv-blocks 64 "
        f"--block-size 16 --threads 1 --port 0 --port-file {port_file}"
    )
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "splitserve.executors.pipeline.stage", *flags.split()],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "SPLITSERVE_OTEL_EXPORTER": "none"},
        )
    try:
        deadline = time.monotonic() + 180
        while not port_file.exists():
            assert proc.poll() is None, Path(log_path).read_text()
            assert time.monotonic() < deadline, "the stage did not start"
            time.sleep(0.1)
        yield f"127.0.0.1:{port_file.read_text().strip()}"
    finally:
        proc.terminate()
        proc.wait(30)
    assert "forward failed" not in Path(log_path).read_text()  # no INTERNAL was logged


def test_stage_forward_fuzz(stage_address: str) -> None:
    """A real last stage: a fuzzed micro-batch gets logits or INVALID_ARGUMENT, never INTERNAL."""
    from splitserve.wire.pipeline_codec import STAGE_CHANNEL_OPTIONS

    channel = grpc.insecure_channel(stage_address, options=STAGE_CHANNEL_OPTIONS)
    stub = rpc.StageStub(channel)
    codes: dict[grpc.StatusCode, int] = {}

    @FUZZ
    @given(wire=step_wires(), raw=st.one_of(st.none(), st.binary(max_size=200)), d=st.data())
    def run(wire: StepWire, raw: bytes | None, d) -> None:
        step = raw if raw is not None or not _fits_int64(wire) else wire_bytes(wire)
        rows = wire.num_tokens
        req = pb.StageForwardRequest(step_wire=step or b"", hidden=d.draw(hidden_tensors(rows)))
        code, result = rpc_code(lambda: list(stub.Forward(iter([req]), timeout=60)))
        codes[code] = codes.get(code, 0) + 1
        assert code in (OK, INVALID), (code, result)
        if code == OK:
            (answer,) = result
            assert answer.logits.shape[0] == len(bytes_wire(step).sample_rows)

    try:
        run()
        assert codes.get(OK, 0) > 0 and codes.get(INVALID, 0) > 0, codes
        # ...and it still serves a sound micro-batch.
        sound = StepWire([1], [0], [0], [1], [[0]], [0])
        hidden = tensor_message(torch.zeros(1, HIDDEN))
        req = pb.StageForwardRequest(step_wire=wire_bytes(sound), hidden=hidden)
        assert len(list(stub.Forward(iter([req]), timeout=60))) == 1
    finally:
        channel.close()
