"""`KVChunk` messages written and read at the protobuf wire level, so KV bytes are copied once.

A prefill worker's PullKV stream is tens of MB of KV in 4 MiB chunks. Through the generated
code every chunk's bytes were copied four times on the way out (out of the lease, into the
message, into the serialized string, into gRPC) and three times on the way in (the parsed
message, its `data` attribute, the reassembly buffer). This module makes the same bytes on
the wire, with the copies that can go gone:

- `encode_chunk`: header, offset and data as one `bytes` of KVChunk's wire form, built with a
  single join from a memoryview of the lease (the server registers PullKV with `as_wire`, which
  passes such bytes through and still serializes a `pb.KVChunk`);
- `parse_chunk`: a received message as a `ChunkView` whose `data` is a memoryview into the
  bytes gRPC handed over, so the only copy left is the one into the reassembly buffer.

Both are ordinary protobuf: any client or server built from the .proto talks to them. The
parser is strict about the input it is given (a peer's bytes): a truncated field, a varint
longer than 10 bytes, an unknown wire type or a repeated header is a `KVCodecError`, never a
misread; unknown fields are skipped as protobuf skips them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from splitserve.v1 import pb
from splitserve.wire.kv_codec import KVCodecError

# A chunk's bytes are copied and checked on a helper thread, off the event loop, when there
# are at least this many of them; fewer are handled on the loop at once (a few hundred
# microseconds at most), where the hop to a thread and back costs more than the work: a
# 32-token prompt's hand-off spent ~1 ms of its ~4.7 in the two hops.
INLINE_BYTES = 1 << 20


async def off_loop(nbytes: int, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)`, on a helper thread if it works through `nbytes` >= INLINE_BYTES bytes."""
    if nbytes >= INLINE_BYTES:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


# KVChunk: header = 1 (message), offset = 2 (uint64), data = 3 (bytes), shm_length = 4 (uint64)
_HEADER_TAG = bytes([1 << 3 | 2])
_OFFSET_TAG = bytes([2 << 3 | 0])
_DATA_TAG = bytes([3 << 3 | 2])
_SHM_LENGTH_TAG = bytes([4 << 3 | 0])


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def encode_chunk(
    offset: int, data: Any, header: pb.KVHeader | None = None, shm_length: int = 0
) -> bytes:
    """A KVChunk's wire bytes; `data` any bytes-like object (a memoryview: no copy before
    the one join). `shm_length` instead of data: that many bytes are in the puller's file."""
    parts = []
    if header is not None:
        h = header.SerializeToString()
        parts += [_HEADER_TAG, _varint(len(h)), h]
    if offset:
        parts += [_OFFSET_TAG, _varint(offset)]
    if len(data):  # proto3 leaves out empty and zero fields, and so does this
        parts += [_DATA_TAG, _varint(len(data)), data]
    if shm_length:
        parts += [_SHM_LENGTH_TAG, _varint(shm_length)]
    return b"".join(parts)


def as_wire(message: bytes | pb.KVChunk) -> bytes:
    """PullKV's response serializer: chunk bytes from `encode_chunk` as they are, a message
    serialized (what a servicer built from the generated code yields)."""
    if isinstance(message, bytes):
        return message
    return message.SerializeToString()


@dataclass(frozen=True)
class ChunkView:
    """A parsed KVChunk; `data` is a view into the received bytes."""

    header: pb.KVHeader | None
    offset: int
    data: memoryview
    shm_length: int = 0  # bytes [offset, offset + shm_length) are in the puller's file


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    for i in range(10):
        if pos + i >= len(buf):
            raise KVCodecError("KV chunk ends inside a varint", "truncated")
        byte = buf[pos + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos + i + 1
        shift += 7
    raise KVCodecError("KV chunk has a varint longer than 10 bytes", "format")


def parse_chunk(raw: bytes) -> ChunkView:
    """PullKV's response deserializer: the chunk without copying its data."""
    buf = memoryview(raw)
    pos, header, offset, data, shm_length = 0, None, 0, memoryview(b""), 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
            if field == 2:
                offset = value
            elif field == 4:
                shm_length = value
            continue
        if wire == 2:
            size, pos = _read_varint(buf, pos)
            if pos + size > len(buf):
                raise KVCodecError(f"KV chunk field {field} runs past the message", "truncated")
            body, pos = buf[pos : pos + size], pos + size
            if field == 1:
                if header is not None:
                    raise KVCodecError("KV chunk carries two headers", "format")
                try:
                    header = pb.KVHeader.FromString(bytes(body))
                except DecodeError as e:
                    raise KVCodecError(f"KV chunk header does not parse: {e}", "format") from None
            elif field == 3:
                data = body
            continue
        if wire in (1, 5):  # fixed 64 / 32 bits: unknown fields of those kinds
            pos += 8 if wire == 1 else 4
            if pos > len(buf):
                raise KVCodecError(f"KV chunk field {field} runs past the message", "truncated")
            continue
        raise KVCodecError(f"KV chunk has wire type {wire} (field {field})", "format")
    if shm_length and len(data):
        raise KVCodecError("KV chunk has both data and shm_length", "format")
    return ChunkView(header, offset, data, shm_length)
