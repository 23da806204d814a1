"""wire/kv_chunks.py: KVChunk written and read at the wire level, byte for byte protobuf's."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest

from splitserve.v1 import pb
from splitserve.wire import kv_chunks
from splitserve.wire.kv_chunks import as_wire, encode_chunk, parse_chunk
from splitserve.wire.kv_codec import KVCodecError

HEADER = pb.KVHeader(dtype="float32", shape=[30, 2, 64, 16, 3, 64], num_tokens=1000,
                     total_bytes=47_185_920, crc32=0xDEADBEEF, layer_end=30, tp_size=1)  # fmt: skip


@pytest.mark.parametrize("offset", [0, 1, 127, 128, 4 << 20, 2**40 + 3])
@pytest.mark.parametrize("with_header", [False, True])
@pytest.mark.parametrize("size", [0, 1, 300, 70_000])
def test_encode_is_what_protobuf_writes(offset, with_header, size):
    data = random.Random(size).randbytes(size)
    msg = pb.KVChunk(offset=offset, data=data)
    if with_header:
        msg.header.CopyFrom(HEADER)
    wire = encode_chunk(offset, memoryview(data), HEADER if with_header else None)
    assert wire == msg.SerializeToString()
    assert pb.KVChunk.FromString(wire) == msg
    view = parse_chunk(wire)
    assert (view.offset, bytes(view.data)) == (offset, data)
    assert view.header == (HEADER if with_header else None)
    assert size == 0 or view.data.obj is wire  # a view of the received bytes, not a copy
    assert as_wire(wire) is wire and as_wire(msg) == wire


def test_unknown_fields_are_skipped_as_protobuf_does():
    wire = encode_chunk(5, b"abc")
    extra = bytes([9 << 3 | 0, 0x96, 0x01])  # varint field 9
    extra += bytes([10 << 3 | 5]) + b"\x01\x02\x03\x04"  # fixed32 field 10
    extra += bytes([11 << 3 | 1]) + bytes(8)  # fixed64 field 11
    extra += bytes([12 << 3 | 2, 2]) + b"zz"  # bytes field 12
    view = parse_chunk(extra + wire)
    assert (view.offset, bytes(view.data), view.header) == (5, b"abc", None)


@pytest.mark.parametrize(
    "raw,reason",
    [
        (encode_chunk(0, b"abcdef")[:-1], "truncated"),  # data shorter than its length
        (bytes([2 << 3 | 0]) + b"\xff" * 11, "format"),  # varint of 11 bytes
        (bytes([2 << 3 | 0, 0x80]), "truncated"),  # varint cut off
        (bytes([3 << 3 | 3]), "format"),  # start-group: not in proto3
        (bytes([7 << 3 | 5, 1]), "truncated"),  # fixed32 cut off
        (encode_chunk(0, b"", HEADER)[:-1] + encode_chunk(0, b"", HEADER), "format"),
        (bytes([1 << 3 | 2, 2, 0x0A, 0x05]), "format"),  # a header that does not parse
    ],
)
def test_malformed_chunks_are_refused(raw, reason):
    with pytest.raises(KVCodecError) as err:
        parse_chunk(raw)
    assert err.value.reason == reason


def test_two_headers_are_refused():
    h = HEADER.SerializeToString()
    raw = bytes([1 << 3 | 2, len(h)]) + h + bytes([1 << 3 | 2, len(h)]) + h
    with pytest.raises(KVCodecError, match="two headers"):
        parse_chunk(raw)


def test_random_bytes_parse_or_raise_kv_codec_error_only():
    rng = random.Random(7)
    base = encode_chunk(4096, rng.randbytes(64), HEADER)
    for _ in range(3000):
        raw = bytearray(base)
        for _ in range(rng.randint(1, 6)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        raw = bytes(raw[: rng.randint(0, len(raw))])
        try:
            view = parse_chunk(raw)
        except KVCodecError:
            continue
        assert len(view.data) <= len(raw)


@pytest.mark.parametrize("shm_length", [1, 8 << 20, 2**40])
@pytest.mark.parametrize("with_header", [False, True])
def test_a_notice_of_bytes_in_the_shared_file_is_what_protobuf_writes(shm_length, with_header):
    msg = pb.KVChunk(offset=8 << 20, shm_length=shm_length)
    if with_header:
        msg.header.CopyFrom(HEADER)
    wire = encode_chunk(8 << 20, b"", HEADER if with_header else None, shm_length=shm_length)
    assert wire == msg.SerializeToString()
    view = parse_chunk(wire)
    assert (view.offset, view.shm_length, len(view.data)) == (8 << 20, shm_length, 0)
    assert parse_chunk(encode_chunk(3, b"abc")).shm_length == 0


def test_a_chunk_with_bytes_and_a_notice_is_refused():
    wire = pb.KVChunk(offset=0, data=b"abc", shm_length=3).SerializeToString()
    with pytest.raises(KVCodecError, match="both data and shm_length"):
        parse_chunk(wire)


def test_large_chunks_are_handled_off_the_loop_and_small_ones_on_it():
    async def where(nbytes: int) -> int:
        return await kv_chunks.off_loop(nbytes, threading.get_ident)

    async def main() -> tuple[int, int, int]:
        return threading.get_ident(), await where(100), await where(kv_chunks.INLINE_BYTES)

    loop_thread, small, large = asyncio.run(main())
    assert small == loop_thread and large != loop_thread
