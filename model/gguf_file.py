"""A GGUF file's header, metadata and tensor table, parsed in one pass over the bytes.

`gguf.GGUFReader` builds a numpy view for every piece of every metadata value; for a model with
a 49k-token vocabulary (tokens, scores, merges) that is hundreds of thousands of views and
several seconds per load, paid by every worker process at start. This reader walks the same
layout (GGUF v2/v3, little-endian: magic, version, counts, key/values, tensor infos, aligned
data) with `struct` and `numpy.frombuffer`, keeps the values as plain Python, and maps the tensor
data lazily. `gguf` stays the authority on quantization types and block sizes.
"""

from __future__ import annotations

import functools
import mmap
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

# GGUF value types, as the format numbers them.
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL = range(8)
_STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = range(8, 13)
_SCALARS = {
    _UINT8: "<u1",
    _INT8: "<i1",
    _UINT16: "<u2",
    _INT16: "<i2",
    _UINT32: "<u4",
    _INT32: "<i4",
    _FLOAT32: "<f4",
    _BOOL: "<u1",
    _UINT64: "<u8",
    _INT64: "<i8",
    _FLOAT64: "<f8",
}
_PLAIN_TYPES = {  # tensor types stored as plain arrays; every other type is bytes of blocks
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}
DEFAULT_ALIGNMENT = 32


@dataclass
class GGUFTensor:
    """One entry of the tensor table. `shape` lists dimensions innermost first, as the file
    does; `data` is a read-only view of the memory map (plain types as their dtype, block types
    as uint8 rows of blocks), made on first use."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: np.ndarray
    n_elements: int
    n_bytes: int
    data_offset: int
    _file: np.ndarray = field(repr=False)  # the whole file, memory-mapped

    @functools.cached_property
    def data(self) -> np.ndarray:
        raw = self._file[self.data_offset : self.data_offset + self.n_bytes]
        dims = tuple(reversed(self.shape.tolist()))
        plain = _PLAIN_TYPES.get(self.tensor_type)
        if plain is not None:
            return raw.view(plain).reshape(dims)
        block, block_bytes = GGML_QUANT_SIZES[self.tensor_type]
        return raw.reshape(*dims[:-1], dims[-1] // block * block_bytes)


class GGUFFile:
    """`metadata` (key -> str, int, float, bool or a list of them; float32 values rounded to
    the shortest text that round-trips, as config.json writes them) and `tensors`."""

    def __init__(self, path: str) -> None:
        self.path = path
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            self._buf = memoryview(mm)
            try:
                self._parse()
            except struct.error as e:
                raise ValueError(f"truncated GGUF header ({e})") from e
            finally:
                self._buf.release()

    def _parse(self) -> None:
        if len(self._buf) < 24 or self._buf[:4] != b"GGUF":
            raise ValueError("not a GGUF file (bad magic or too short)")
        version, tensor_count, kv_count = struct.unpack_from("<IQQ", self._buf, 4)
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version} (or a big-endian file)")
        self._pos = 24
        self.metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = self._string()
            self.metadata[key] = self._value(self._u32())
        infos = [self._tensor_info() for _ in range(tensor_count)]
        alignment = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"bad general.alignment {alignment}")
        start = -(-self._pos // alignment) * alignment
        whole = np.memmap(self.path, dtype=np.uint8, mode="r") if infos else None
        self._whole = whole
        self.tensors: list[GGUFTensor] = []
        seen: set[str] = set()
        for name, dims, kind, offset in infos:
            if name in seen:
                raise ValueError(f"tensor {name} appears twice")
            seen.add(name)
            qtype = GGMLQuantizationType(kind)
            block, block_bytes = GGML_QUANT_SIZES[qtype]
            n_elements = int(np.prod(dims.astype(object))) if len(dims) else 1
            if dims.size and int(dims[0]) % block:
                raise ValueError(f"tensor {name}: rows of {dims[0]} are not whole blocks")
            n_bytes = n_elements // block * block_bytes
            self.tensors.append(
                GGUFTensor(name, qtype, dims, n_elements, n_bytes, start + offset, whole)
            )

    def drop_pages(self) -> None:
        """Let the file's pages go from this process's resident memory (they stay in the page
        cache, and come back on the next read): once a model is loaded its weights live in
        the model's own tensors, and the mapped file would otherwise count its full size in
        the worker's RSS for as long as the checkpoint is open."""
        mm = getattr(getattr(self, "_whole", None), "_mmap", None)
        if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
            mm.madvise(mmap.MADV_DONTNEED)

    # ---- primitive reads --------------------------------------------------------------------
    def _take(self, n: int) -> memoryview:
        if n < 0 or self._pos + n > len(self._buf):
            raise ValueError("truncated GGUF header")
        out = self._buf[self._pos : self._pos + n]
        self._pos += n
        return out

    def _u32(self) -> int:
        return struct.unpack("<I", self._take(4))[0]

    def _u64(self) -> int:
        return struct.unpack("<Q", self._take(8))[0]

    def _string(self) -> str:
        return str(self._take(self._u64()), "utf-8")

    def _value(self, kind: int) -> Any:
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            item, count = self._u32(), self._u64()
            if item == _STRING:
                return [self._string() for _ in range(count)]
            if item not in _SCALARS:
                raise ValueError(f"unsupported GGUF array item type {item}")
            dtype = np.dtype(_SCALARS[item])
            values = np.frombuffer(self._take(count * dtype.itemsize), dtype=dtype)
            return values.astype(bool).tolist() if item == _BOOL else values.tolist()
        if kind not in _SCALARS:
            raise ValueError(f"unsupported GGUF value type {kind}")
        dtype = np.dtype(_SCALARS[kind])
        value = np.frombuffer(self._take(dtype.itemsize), dtype=dtype)[0]
        if kind == _BOOL:
            return bool(value)
        if kind == _FLOAT32:  # the 1e-05 of config.json, not 9.99e-06
            return float(str(value))
        return value.item()

    def _tensor_info(self) -> tuple[str, np.ndarray, int, int]:
        name = self._string()
        n_dims = self._u32()
        if n_dims > 8:
            raise ValueError(f"tensor {name} has {n_dims} dimensions")
        dims = np.frombuffer(self._take(8 * n_dims), dtype="<u8").astype(np.uint64)
        kind = self._u32()
        offset = self._u64()
        return name, dims, kind, offset
