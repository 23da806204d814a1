"""The kvstore's block payload format, without torch: what a stored value is and how to check it.

A payload is self-describing so a value can be trusted only after it proved what it is:

    magic "SSKV" | version u8 | dtype code u8 | ndim u8 | shape u32 × ndim
    | key length u16 | key | CRC-32 of data u32 | [tag, 32 bytes: version 2 only]
    | data (raw tensor bytes, little-endian)

Version 2 is a **signed** block: the tag is an HMAC-SHA256, keyed with the mesh secret the
workers share, over a domain string, every header byte before the tag (so the key, dtype,
shape and checksum) and the data. The kvstore and Redis only keep bytes: whoever can write to
them without the secret can store a structurally perfect payload (another prompt's KV re-keyed
under this prompt's hash chain), but not one whose tag verifies, so a worker with the secret
never uses it. Version 1 is the same layout without the tag: what a worker with no secret
writes, and what a worker with one rejects as "unsigned".

`engine.kv_codec` turns tensors into payloads and back; the kvstore, which keeps bytes and never
imports torch or the model, uses `verify_payload` (without a secret: structure, key and
checksum only) to turn a value that was stored under another key, truncated or corrupted into a
miss. Every failure is a `KVPayloadError` whose `reason` (one of `REASONS`) names the check
that failed, for the workers' rejection metric.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

try:  # the same checksum as zlib's, with the CPU's carry-less multiply: 2.2x faster here
    from zlib_ng.zlib_ng import crc32
except ImportError:  # pragma: no cover - a dependency; zlib gives the same numbers
    from zlib import crc32

MAGIC = b"SSKV"
VERSION_UNSIGNED = 1
VERSION_SIGNED = 2
VERSION = VERSION_SIGNED  # the newest format
MAX_KEY_BYTES = 0xFFFF  # the key length is a u16
TAG_BYTES = 32  # HMAC-SHA256
# Binds a tag to this use of the secret: a MAC computed for anything else never verifies here.
TAG_DOMAIN = b"splitserve/kv-block/v2\x00"
MIN_SECRET_BYTES = 16
MESH_SECRET_ENV = "SPLITSERVE_MESH_SECRET"

# Codes are part of the stored format: never renumber, only append. "kv_int8" and "kv_fp8_e4m3"
# are a low-precision KV cache's packed rows (model/kv_quant.py): bytes whose last axis is
# head_dim int8 (or float8_e4m3fn) values and then the row's little-endian bfloat16 scale.
DTYPE_CODES = {
    "float32": 1,
    "bfloat16": 2,
    "float16": 3,
    "int8": 4,
    "uint8": 5,
    "kv_int8": 6,
    "kv_fp8_e4m3": 7,
}
DTYPE_BY_CODE = {v: k for k, v in DTYPE_CODES.items()}
ITEMSIZE = {
    "float32": 4,
    "bfloat16": 2,
    "float16": 2,
    "int8": 1,
    "uint8": 1,
    "kv_int8": 1,
    "kv_fp8_e4m3": 1,
}
PACKED_SCALE_BYTES = 2  # the bfloat16 scale at the end of each packed row

# Why a payload was refused: the label values of the workers' rejection counter.
REASONS = (
    "format",  # not a splitserve payload at all (bad magic)
    "version",  # a version this reader doesn't know
    "truncated",  # header or data cut short
    "size",  # more data bytes than dtype and shape call for
    "dtype",  # unknown dtype code, or not the reader's dtype
    "shape",  # not the reader's block shape
    "key",  # stored under another key
    "checksum",  # CRC-32 of the data is wrong
    "unsigned",  # a version 1 payload where a signed one is required
    "signature",  # the tag doesn't verify with this mesh's secret
    "nonfinite",  # sound bytes, but inf or nan values (engine.kv_codec.check_finite)
)

_HEAD = struct.Struct("<4sBBB")  # magic, version, dtype code, ndim
_KEY_LEN = struct.Struct("<H")
_CRC = struct.Struct("<I")


class KVPayloadError(ValueError):
    """Bytes that are not the payload the reader expects; `reason` is one of REASONS."""

    def __init__(self, message: str, reason: str = "format") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class PayloadHeader:
    dtype: str
    shape: tuple[int, ...]
    key: bytes
    crc32: int
    data_offset: int  # where the raw bytes start in the payload
    version: int = VERSION_UNSIGNED
    tag: bytes = b""  # version 2: the HMAC; it sits just before data_offset

    @property
    def data_bytes(self) -> int:
        """How many data bytes the dtype and shape call for."""
        n = ITEMSIZE[self.dtype]
        for s in self.shape:
            n *= s
        return n

    @property
    def signed(self) -> bool:
        return self.version == VERSION_SIGNED


def encode_payload(
    key: bytes, dtype: str, shape: Sequence[int], data: bytes, secret: bytes | None = None
) -> bytes:
    """A payload holding `data` (raw bytes of a `dtype` tensor of `shape`) under `key`:
    signed (version 2) with `secret`, unsigned (version 1) without."""
    if dtype not in DTYPE_CODES:
        raise KVPayloadError(f"unsupported KV dtype {dtype}", "dtype")
    if len(key) > MAX_KEY_BYTES:
        raise KVPayloadError(f"key of {len(key)} bytes is longer than {MAX_KEY_BYTES}", "key")
    version = VERSION_UNSIGNED if secret is None else VERSION_SIGNED
    head = b"".join(
        (
            _HEAD.pack(MAGIC, version, DTYPE_CODES[dtype], len(shape)),
            struct.pack(f"<{len(shape)}I", *shape),
            _KEY_LEN.pack(len(key)),
            key,
            _CRC.pack(crc32(data)),
        )
    )
    if secret is None:
        return head + data
    return b"".join((head, block_tag(secret, head, data), data))


def block_tag(secret: bytes, head: bytes | memoryview, data: bytes | memoryview) -> bytes:
    """The HMAC-SHA256 of a signed payload: over the domain, the header before the tag, and
    the data (hashlib releases the GIL on buffers this large)."""
    mac = hmac.new(secret, TAG_DOMAIN, hashlib.sha256)
    mac.update(head)
    mac.update(data)
    return mac.digest()


def parse_header(payload: bytes | memoryview) -> PayloadHeader:
    """The header, checked for structure only (no key, size, checksum or tag check)."""
    try:
        magic, version, code, ndim = _HEAD.unpack_from(payload, 0)
    except struct.error as exc:
        raise KVPayloadError(f"truncated KV payload: {exc}", "truncated") from None
    if magic != MAGIC:
        raise KVPayloadError("not a splitserve KV payload (bad magic)", "format")
    if version not in (VERSION_UNSIGNED, VERSION_SIGNED):
        raise KVPayloadError(f"KV payload version {version} is not 1 or 2", "version")
    try:
        off = _HEAD.size
        shape = struct.unpack_from(f"<{ndim}I", payload, off)
        off += 4 * ndim
        (klen,) = _KEY_LEN.unpack_from(payload, off)
        off += _KEY_LEN.size
        key = bytes(payload[off : off + klen])
        off += klen
        (crc,) = _CRC.unpack_from(payload, off)
    except struct.error as exc:
        raise KVPayloadError(f"truncated KV payload: {exc}", "truncated") from None
    if len(key) != klen:
        raise KVPayloadError("truncated KV payload: key cut short", "truncated")
    if code not in DTYPE_BY_CODE:
        raise KVPayloadError(f"unknown KV dtype code {code}", "dtype")
    off += _CRC.size
    tag = b""
    if version == VERSION_SIGNED:
        tag = bytes(payload[off : off + TAG_BYTES])
        if len(tag) != TAG_BYTES:
            raise KVPayloadError("truncated KV payload: tag cut short", "truncated")
        off += TAG_BYTES
    return PayloadHeader(DTYPE_BY_CODE[code], tuple(shape), key, crc, off, version, tag)


def payload_data(payload: bytes, header: PayloadHeader) -> memoryview:
    return memoryview(payload)[header.data_offset :]


def verify_payload(payload: bytes, key: bytes, secret: bytes | None = None) -> PayloadHeader:
    """The header of a payload that is exactly what `key` should hold, else KVPayloadError.

    With `secret`, only a signed payload whose tag verifies (in constant time) passes; without
    one (the kvstore, a worker of an unsigned mesh) both versions are checked for structure,
    key and checksum only. The key check comes first: it is cheap, and a value under the wrong
    key is the failure that would otherwise hand a request another prompt's KV. The checksum
    comes before the tag, so accidental corruption is counted as such, not as forgery.
    """
    header = parse_header(payload)
    if header.key != key:
        raise KVPayloadError("KV payload was stored under another key", "key")
    if secret is not None and not header.signed:
        raise KVPayloadError("KV payload is unsigned; this mesh requires signed blocks", "unsigned")
    data = payload_data(payload, header)
    if len(data) != header.data_bytes:
        raise KVPayloadError(
            f"KV payload has {len(data)} data bytes; {header.shape} {header.dtype} "
            f"needs {header.data_bytes}",
            "truncated" if len(data) < header.data_bytes else "size",
        )
    if crc32(data) != header.crc32:
        raise KVPayloadError("KV payload checksum mismatch", "checksum")
    if secret is not None:
        head = memoryview(payload)[: header.data_offset - TAG_BYTES]
        if not hmac.compare_digest(block_tag(secret, head, data), header.tag):
            raise KVPayloadError("KV payload signature does not verify", "signature")
    return header


def is_valid_payload(payload: bytes, key: bytes, secret: bytes | None = None) -> bool:
    try:
        verify_payload(payload, key, secret)
    except KVPayloadError:
        return False
    return True


# ---- the mesh secret ------------------------------------------------------------------------
def load_mesh_secret(
    path: str | None, environ: Mapping[str, str] | None = os.environ
) -> bytes | None:
    """The secret from `path` (the file's bytes, surrounding whitespace stripped), else from
    SPLITSERVE_MESH_SECRET in `environ` (None: don't look), else None. ValueError, in one line,
    for a file that can't be read or a secret shorter than MIN_SECRET_BYTES."""
    if path:
        try:
            with open(path, "rb") as f:
                secret = f.read().strip()
        except OSError as exc:
            raise ValueError(f"mesh secret file {path}: {exc.strerror or exc}") from None
        where = f"mesh secret file {path}"
    elif environ is not None and environ.get(MESH_SECRET_ENV):
        secret = environ[MESH_SECRET_ENV].strip().encode()
        where = MESH_SECRET_ENV
    else:
        return None
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(
            f"{where} holds {len(secret)} bytes; a mesh secret needs at least {MIN_SECRET_BYTES}"
        )
    return secret
