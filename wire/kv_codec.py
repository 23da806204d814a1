"""KV tensors as bytes that can cross a process boundary safely: never pickle.

Two uses, one set of rules (a whitelist of dtypes, shapes checked against what the receiver
expects *before* anything is allocated, a checksum over the bytes, and no inf or nan values:
KV that holds one would poison every request that later shares its prefix):

- **Block payloads** for the kvstore: one block of every layer, self-describing
  (magic, version, dtype, shape, the block's key, CRC-32, raw bytes), signed with the mesh
  secret when the workers have one (an HMAC over the key, header and bytes). A payload whose
  key, checksum, shape, dtype or signature doesn't match is a miss, never a wrong answer. The
  format itself lives in `kv_payload`, torch-free, so the kvstore checks values with exactly
  the same code.
- **Transfers** from prefill to decode: a header (dtype, shape, byte count, CRC-32) and the raw
  bytes cut into chunks of at most 4 MiB, reassembled by `KVAssembler`.

KV moves as it lies in the pool. A low-precision cache (`--kv-cache-dtype int8|fp8_e4m3`) is
bytes, so its "dtype" is the format's name, `kv_int8` or `kv_fp8_e4m3` (packed rows: values,
then each row's bfloat16 scale; model/kv_quant.py), never `uint8`: the name says how to read
the bytes. A receiver whose cache has another format refuses, naming both and the flag; it
never reads one format's bytes as another's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from splitserve.wire import kv_payload
from splitserve.wire.kept import KeptBySize
from splitserve.wire.kv_payload import MAGIC, VERSION, KVPayloadError, crc32  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from splitserve.wire.kv_shm import Segment

CHUNK_BYTES = 4 * 1024 * 1024
MAX_TRANSFER_BYTES = 4 * 1024**3

DTYPE_NAMES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    # packed low-precision KV rows (see the module docstring): stored as bytes
    "kv_int8": torch.uint8,
    "kv_fp8_e4m3": torch.uint8,
}
PACKED_FORMATS = ("kv_int8", "kv_fp8_e4m3")
# The stored codes are kv_payload's, so torch-free readers (the kvstore) agree with us.
DTYPE_CODES = {
    DTYPE_NAMES[name]: code
    for name, code in kv_payload.DTYPE_CODES.items()
    if name not in PACKED_FORMATS
}
DTYPE_BY_CODE = {v: k for k, v in DTYPE_CODES.items()}

# One error type for every malformed-KV path, so `except KVCodecError` also catches the
# payload checks that kv_payload makes.
KVCodecError = KVPayloadError


# numpy has no bfloat16: such tensors go through an integer view of the same width.
_SAME_WIDTH_INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16}


def tensor_bytes(t: torch.Tensor) -> bytes:
    """`t`'s elements in C order. numpy does the copy of a non-contiguous view, on one thread:
    a torch copy would start an OpenMP team on the calling thread (an asyncio or helper
    thread), which slows the engine thread's own parallel regions from then on."""
    t = t.detach().cpu()
    return t.view(_SAME_WIDTH_INT.get(t.dtype, t.dtype)).numpy().tobytes()


def tensor_view(t: torch.Tensor) -> memoryview:
    """`t`'s elements in C order as a flat byte view, without a copy when `t` is contiguous
    (the view keeps `t` alive); a non-contiguous `t` is copied once, as `tensor_bytes` does."""
    t = t.detach().cpu()
    if not t.is_contiguous():
        return memoryview(tensor_bytes(t))
    return memoryview(t.view(_SAME_WIDTH_INT.get(t.dtype, t.dtype)).numpy()).cast("B")


def bytes_to_tensor(
    data: bytes | bytearray | memoryview, dtype: torch.dtype, shape: Sequence[int]
) -> torch.Tensor:
    expected = _numel(shape) * dtype.itemsize
    if len(data) != expected:
        raise KVCodecError(
            f"{len(data)} bytes for shape {tuple(shape)} {dtype}: want {expected}", "size"
        )
    if expected == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return flat.view(dtype).reshape(tuple(shape))


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        if s < 0:
            raise KVCodecError(f"negative dimension in {tuple(shape)}", "shape")
        n *= s
    return n


# Where a float's exponent is all ones, the value is inf or nan: (unsigned view, exponent mask).
_FINITE_STEP = 1 << 18  # words checked at a time
_EXPONENT = {
    torch.float32: (np.uint32, 0x7F800000),
    torch.bfloat16: (np.uint16, 0x7F80),
    torch.float16: (np.uint16, 0x7C00),
}


def check_finite(
    data: bytes | bytearray | memoryview, dtype: torch.dtype | str, row: int | None = None
) -> None:
    """KVCodecError (reason "nonfinite") if a float in `data` is inf or nan.

    A KV cache never holds one (its pool starts zeroed, and a model that made one has failed);
    adopted, it would turn every later request that shares the prefix into nan logits. numpy
    on an integer view: one thread, whatever thread this runs on (see tensor_bytes). Packed
    rows (`dtype` a format name, `row` their width in bytes) have their scales checked, and
    e4m3 values their nan codes."""
    if isinstance(dtype, str):
        if dtype in PACKED_FORMATS:
            _check_packed(data, dtype, row)
            return
        dtype = parse_dtype_name(dtype)
    if dtype not in _EXPONENT:
        return
    uint, mask = _EXPONENT[dtype]
    words = np.frombuffer(data, dtype=uint)
    exponent = uint(mask)
    step = _FINITE_STEP
    scratch = np.empty(min(step, len(words)), dtype=uint)  # cache-sized: no big temporaries
    for start in range(0, len(words), step):
        part = words[start : start + step]
        bits = np.bitwise_and(part, exponent, out=scratch[: len(part)])
        if (bits == exponent).any():
            raise KVCodecError("KV holds inf or nan values", "nonfinite")


def _check_packed(data: bytes | bytearray | memoryview, fmt: str, row: int | None) -> None:
    if not row or row <= kv_payload.PACKED_SCALE_BYTES or len(data) % row:
        raise KVCodecError(f"{fmt} rows of {row} bytes do not divide {len(data)} bytes", "shape")
    rows = np.frombuffer(data, dtype=np.uint8).reshape(-1, row)
    if row % 2 == 0:  # the scales as a strided column of the rows' words: read in place
        scales = np.frombuffer(data, dtype="<u2").reshape(-1, row // 2)[:, -1]
    else:
        scales = np.ascontiguousarray(rows[:, -kv_payload.PACKED_SCALE_BYTES :]).view("<u2")
    # a bfloat16 at or above 0x7F80 is +inf, a nan, or has its sign bit set: one comparison
    # each, no temporaries (2.3x faster than masking twice: 8 MiB of int8 KV in 0.42 ms)
    if len(scales) and scales.max() >= 0x7F80:
        raise KVCodecError(f"{fmt} KV holds a negative, inf or nan scale", "nonfinite")
    if fmt == "kv_fp8_e4m3" and ((rows[:, : -kv_payload.PACKED_SCALE_BYTES] & 0x7F) == 0x7F).any():
        raise KVCodecError("kv_fp8_e4m3 KV holds nan values", "nonfinite")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def format_name(dtype: torch.dtype | str) -> str:
    """A KV format's wire name: a float dtype's own, or a packed format's ("kv_int8")."""
    return dtype if isinstance(dtype, str) else dtype_name(dtype)


def _flag(fmt: str) -> str:
    return f"--kv-cache-dtype {fmt[3:]}" if fmt in PACKED_FORMATS else "--kv-cache-dtype auto"


def format_mismatch(sent: str, mine: str) -> str:
    """One line for KV of another format: both formats and the flags that make them."""
    return (
        f"KV dtype {sent} ({_flag(sent)}) does not match this worker's {mine} ({_flag(mine)}); "
        "start every worker with the same --dtype and --kv-cache-dtype"
    )


def parse_dtype_name(name: str) -> torch.dtype:
    if name not in DTYPE_NAMES:
        raise KVCodecError(f"KV dtype {name!r} is not one of {', '.join(DTYPE_NAMES)}", "dtype")
    return DTYPE_NAMES[name]


# ---- kvstore block payloads -----------------------------------------------------------------
def encode_block(
    key: bytes, block: torch.Tensor, secret: bytes | None = None, fmt: str | None = None
) -> bytes:
    """One block's KV (any shape) with its key and checksum, signed when given the secret.
    `fmt`: the packed format a byte tensor holds (default: the tensor's dtype)."""
    name = fmt or dtype_name(block.dtype)
    if DTYPE_NAMES.get(name) != block.dtype:
        raise KVCodecError(f"unsupported KV dtype {block.dtype} as {name}", "dtype")
    return kv_payload.encode_payload(key, name, tuple(block.shape), tensor_bytes(block), secret)


def decode_block(
    payload: bytes,
    key: bytes,
    dtype: torch.dtype | str,
    shape: Sequence[int],
    secret: bytes | None = None,
) -> torch.Tensor:
    """The block, or KVCodecError (its `reason` says which check failed) if the payload isn't
    exactly what `key` should hold: with `secret`, signed by a holder of that secret too.
    `dtype`: the cache's, or its packed format's name (`format_name`).

    Dtype and shape are compared before any checksum or tag is computed: a block that could
    never fit this cache costs nothing to refuse."""
    header = kv_payload.parse_header(payload)
    want = format_name(dtype)
    if header.dtype != want:
        raise KVCodecError(f"KV payload is {header.dtype}, expected {dtype}", "dtype")
    if header.shape != tuple(shape):
        raise KVCodecError(f"KV payload is {header.shape}, expected {tuple(shape)}", "shape")
    header = kv_payload.verify_payload(payload, key, secret)
    data = kv_payload.payload_data(payload, header)
    check_finite(data, want, shape[-1] if shape else None)
    return bytes_to_tensor(data, DTYPE_NAMES[want], shape)


# ---- prefill -> decode transfers ------------------------------------------------------------
@dataclass(frozen=True)
class TransferHeader:
    dtype: str
    shape: tuple[int, ...]
    num_tokens: int
    total_bytes: int
    crc32: int


def split_transfer(
    kv: torch.Tensor, num_tokens: int, chunk_bytes: int = CHUNK_BYTES, fmt: str | None = None
) -> tuple[TransferHeader, Iterator[tuple[int, bytes]]]:
    """A header and (offset, bytes) chunks of at most `chunk_bytes` each. `fmt`: the packed
    format a byte tensor holds (default: the tensor's dtype)."""
    header, data = export_transfer(kv, num_tokens, fmt)

    def chunks() -> Iterator[tuple[int, bytes]]:
        for off in range(0, len(data), chunk_bytes):
            yield off, bytes(data[off : off + chunk_bytes])

    return header, chunks()


def export_transfer(
    kv: torch.Tensor, num_tokens: int, fmt: str | None = None
) -> tuple[TransferHeader, memoryview]:
    """A header and `kv`'s bytes as a view (no copy): what a prefill worker holds under a
    lease and cuts into chunks as it sends them (wire/kv_chunks.py)."""
    name = fmt or dtype_name(kv.dtype)
    if DTYPE_NAMES.get(name) != kv.dtype:
        raise KVCodecError(f"a {kv.dtype} tensor can't be sent as {name}", "dtype")
    data = tensor_view(kv)
    return TransferHeader(name, tuple(kv.shape), num_tokens, len(data), crc32(data)), data


# A received chunk is checksummed and finite-checked this many bytes at a time (well inside L2):
# on KV cold in memory, 19-23% less time than two passes over the whole chunk (12 MB of int8
# KV 2.80 -> 2.28 ms, 47 MB of float32 9.5 -> 7.4 ms, Sapphire Rapids; 1 MiB spans gained
# little).
CHECK_SPAN = 256 << 10


class KVAssembler:
    """Reassembles one transfer; validates the header against what the receiver can accept."""

    def __init__(
        self,
        header: TransferHeader,
        expected_dtype: torch.dtype | str,
        cache_shape: Sequence[int],
        max_bytes: int = MAX_TRANSFER_BYTES,
        buffers: ReceiveBuffers | None = None,
        segment: Segment | None = None,
    ) -> None:
        """`cache_shape`: the receiver's pool, (layers, 2, num_blocks, block_size, kvh, hd);
        `expected_dtype`: its dtype, or its packed format's name (`format_name`); where the
        bytes land: `segment` (a same-host hand-off's file, wire/kv_shm.py), else a buffer
        from `buffers`, else a fresh one."""
        dtype = parse_dtype_name(header.dtype)
        if header.dtype != format_name(expected_dtype):
            raise KVCodecError(format_mismatch(header.dtype, format_name(expected_dtype)), "dtype")
        shape, pool = tuple(header.shape), tuple(cache_shape)
        if (
            len(shape) != len(pool)
            or shape[:2] + shape[3:] != pool[:2] + pool[3:]
            or not 0 < shape[2] <= pool[2]
        ):
            raise KVCodecError(f"KV shape {shape} does not fit this worker's cache {pool}", "shape")
        nbytes = _numel(shape) * dtype.itemsize
        if nbytes != header.total_bytes or nbytes > max_bytes:
            raise KVCodecError(
                f"KV transfer declares {header.total_bytes} bytes; shape needs "
                f"{nbytes} (limit {max_bytes})",
                "size",
            )
        self.header, self.dtype, self.format = header, dtype, header.dtype
        self.buffer: bytearray | None = None
        self.segment = segment
        if segment is not None:
            if segment.nbytes < nbytes:
                raise KVCodecError(f"a {segment.nbytes}-byte segment for {nbytes} bytes", "size")
            self._buf = segment.view()[:nbytes]
        else:
            self.buffer = bytearray(nbytes) if buffers is None else buffers.take(nbytes)
            self._buf = memoryview(self.buffer)[:nbytes]
        self._received = 0
        # Checked as the chunks come (while the next one is on its way), not all at the end:
        # the running CRC-32, and the finite check up to the last whole row received.
        self._crc = 0
        self._checked = 0
        self._row = header.shape[-1] if header.dtype in PACKED_FORMATS else dtype.itemsize

    def add(self, offset: int, data: bytes | memoryview) -> None:
        """A chunk of streamed bytes (into the segment, if there is one, by pwrite)."""
        self._expect(offset, len(data))
        if self.segment is not None:
            self.segment.write(offset, data)
        else:
            self._buf[offset : offset + len(data)] = data
        self._accept(offset, len(data))

    def add_written(self, offset: int, length: int) -> None:
        """A chunk the sender wrote into the segment itself: checked where it lies."""
        if self.segment is None:
            raise KVCodecError("KV announced in a shared file, but this pull named none", "format")
        self._expect(offset, length)
        self._accept(offset, length)

    def _expect(self, offset: int, length: int) -> None:
        if offset != self._received or offset + length > len(self._buf):
            raise KVCodecError(f"KV chunk at offset {offset} (+{length}) out of order", "truncated")

    def _accept(self, offset: int, length: int) -> None:
        # CHECK_SPAN bytes at a time, so that the finite check reads from cache what the
        # CRC-32 has just read from memory (one pass over RAM instead of two).
        end = offset + length
        for start in range(offset, end, CHECK_SPAN):
            stop = min(end, start + CHECK_SPAN)
            self._crc = crc32(self._buf[start:stop], self._crc)
            self._received = stop
            self._check_rows(stop - stop % self._row)

    def _check_rows(self, end: int) -> None:
        if end > self._checked:
            view = memoryview(self._buf)[self._checked : end]
            check_finite(view, self.format, self.header.shape[-1])
            self._checked = end

    @property
    def complete(self) -> bool:
        """Every byte the header declared has arrived (and been checked as it came)."""
        return self._received == len(self._buf)

    def finish(self) -> torch.Tensor:
        if self._received != len(self._buf):
            raise KVCodecError(
                f"KV transfer ended after {self._received} of {len(self._buf)} bytes", "truncated"
            )
        if self._crc != self.header.crc32:
            raise KVCodecError("KV transfer checksum mismatch", "checksum")
        self._check_rows(len(self._buf))
        return (
            torch.frombuffer(self._buf, dtype=torch.uint8)
            .view(self.dtype)
            .reshape(self.header.shape)
        )


class ReceiveBuffers(KeptBySize[bytearray]):
    """Receive buffers of streamed pulls kept for the next one (wire/kept.py says why), up to
    `keep_bytes`. glibc would hand a block this large straight back to the kernel when freed.
    A transfer that failed part-way, whose copy may still be running on a helper thread, never
    gives its buffer back: it just drops it."""

    def _size(self, item: bytearray) -> int:
        return len(item)

    def _new(self, nbytes: int) -> bytearray:
        return bytearray(nbytes)
