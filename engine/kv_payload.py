"""The kvstore's block payload format, without torch: what a stored value is and how to check it.

A payload is self-describing so a value can be trusted only after it proved what it is:

    magic "SSKV" | version u8 | dtype code u8 | ndim u8 | shape u32 × ndim
    | key length u16 | key | CRC-32 of data u32 | data (raw tensor bytes, little-endian)

`engine.kv_codec` turns tensors into payloads and back; the kvstore, which keeps bytes and never
imports torch or the model, uses `verify_payload` to turn a value that was stored under another
key, truncated or corrupted into a miss.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

MAGIC = b"SSKV"
VERSION = 1
MAX_KEY_BYTES = 0xFFFF  # the key length is a u16

# Codes are part of the stored format: never renumber, only append.
DTYPE_CODES = {"float32": 1, "bfloat16": 2, "float16": 3, "int8": 4, "uint8": 5}
DTYPE_BY_CODE = {v: k for k, v in DTYPE_CODES.items()}
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "uint8": 1}

_HEAD = struct.Struct("<4sBBB")  # magic, version, dtype code, ndim
_KEY_LEN = struct.Struct("<H")
_CRC = struct.Struct("<I")


class KVPayloadError(ValueError):
    """Bytes that are not the payload the reader expects."""


@dataclass(frozen=True)
class PayloadHeader:
    dtype: str
    shape: tuple[int, ...]
    key: bytes
    crc32: int
    data_offset: int  # where the raw bytes start in the payload

    @property
    def data_bytes(self) -> int:
        """How many data bytes the dtype and shape call for."""
        n = ITEMSIZE[self.dtype]
        for s in self.shape:
            n *= s
        return n


def encode_payload(key: bytes, dtype: str, shape: Sequence[int], data: bytes) -> bytes:
    """A payload holding `data` (raw bytes of a `dtype` tensor of `shape`) under `key`."""
    if dtype not in DTYPE_CODES:
        raise KVPayloadError(f"unsupported KV dtype {dtype}")
    if len(key) > MAX_KEY_BYTES:
        raise KVPayloadError(f"key of {len(key)} bytes is longer than {MAX_KEY_BYTES}")
    return b"".join(
        (
            _HEAD.pack(MAGIC, VERSION, DTYPE_CODES[dtype], len(shape)),
            struct.pack(f"<{len(shape)}I", *shape),
            _KEY_LEN.pack(len(key)),
            key,
            _CRC.pack(zlib.crc32(data)),
            data,
        )
    )


def parse_header(payload: bytes | memoryview) -> PayloadHeader:
    """The header, checked for structure only (no key, size or checksum check)."""
    try:
        magic, version, code, ndim = _HEAD.unpack_from(payload, 0)
        off = _HEAD.size
        shape = struct.unpack_from(f"<{ndim}I", payload, off)
        off += 4 * ndim
        (klen,) = _KEY_LEN.unpack_from(payload, off)
        off += _KEY_LEN.size
        key = bytes(payload[off : off + klen])
        off += klen
        (crc,) = _CRC.unpack_from(payload, off)
    except struct.error as exc:
        raise KVPayloadError(f"truncated KV payload: {exc}") from None
    if magic != MAGIC or version != VERSION:
        raise KVPayloadError("not a splitserve KV payload (bad magic or version)")
    if len(key) != klen:
        raise KVPayloadError("truncated KV payload: key cut short")
    if code not in DTYPE_BY_CODE:
        raise KVPayloadError(f"unknown KV dtype code {code}")
    return PayloadHeader(DTYPE_BY_CODE[code], tuple(shape), key, crc, off + _CRC.size)


def payload_data(payload: bytes, header: PayloadHeader) -> memoryview:
    return memoryview(payload)[header.data_offset :]


def verify_payload(payload: bytes, key: bytes) -> PayloadHeader:
    """The header of a payload that is exactly what `key` should hold, else KVPayloadError.

    The key check comes first: it is cheap, and a value under the wrong key is the failure that
    would otherwise hand a request another prompt's KV.
    """
    header = parse_header(payload)
    if header.key != key:
        raise KVPayloadError("KV payload was stored under another key")
    data = payload_data(payload, header)
    if len(data) != header.data_bytes:
        raise KVPayloadError(
            f"KV payload has {len(data)} data bytes; {header.shape} {header.dtype} "
            f"needs {header.data_bytes}"
        )
    if zlib.crc32(data) != header.crc32:
        raise KVPayloadError("KV payload checksum mismatch")
    return header


def is_valid_payload(payload: bytes, key: bytes) -> bool:
    try:
        verify_payload(payload, key)
    except KVPayloadError:
        return False
    return True
