"""The KV cache at low precision: int8 or fp8 (e4m3) values, one bfloat16 scale per token and
KV head (`--kv-cache-dtype int8|fp8_e4m3`).

The pool stays one tensor, of bytes, so everything that moves KV (the prefill -> decode
hand-off, kvstore blocks, tensor-parallel and pipeline moves) moves it as it lies in the pool:

    (layers, 2, num_blocks, block_size, kv_heads, head_dim + 2)  uint8

Each (token, KV head) row holds its `head_dim` values (int8, or float8_e4m3fn bits), then its
scale as a little-endian bfloat16; a value is `q * scale`. A row's scale is its largest
|value| over the largest code (127, or 448 for e4m3), rounded to bfloat16, and the row is
quantized with that rounded scale, so the stored scale is exactly the one used. A scale per
token (not per block) means a block is never re-quantized as it fills, and an outlier token
costs precision only in its own row. Its cost is 2 bytes per head_dim values: for SmolLM2's
head_dim 64, 66 bytes per row against 128 in bfloat16 (1.94x the tokens) and 256 in float32
(3.88x).

Attention reads the packed rows directly: the torch backend dequantizes only the blocks it
gathered for a step, the C++ decode kernel converts each row in its inner loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitserve.engine.config import KV_CACHE_DTYPES

SCALE_BYTES = 2  # one bfloat16 per row
STORAGE_DTYPE = torch.uint8


@dataclass(frozen=True)
class KVQuant:
    """One low-precision KV format: how a row of `head_dim` values is packed and read."""

    name: str  # the flag's value: "int8" | "fp8_e4m3"
    value_dtype: torch.dtype  # what a value byte means
    qmax: float  # the largest code a scaled value is mapped to
    code: int  # the C++ kernel's format number

    @property
    def wire_name(self) -> str:
        """The format's name in transfer headers and kvstore payloads."""
        return f"kv_{self.name}"

    @staticmethod
    def row_width(head_dim: int) -> int:
        """Bytes per (token, KV head) row."""
        return head_dim + SCALE_BYTES

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """(..., head_dim) floats -> (..., head_dim + 2) uint8 packed rows."""
        xf = x.float()
        amax = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)
        scale = (amax / self.qmax).to(torch.bfloat16)  # (..., 1), what is stored
        scaled = (xf / scale.float()).clamp(-self.qmax, self.qmax)
        if self.value_dtype == torch.int8:
            values = scaled.round().to(torch.int8)
        else:
            values = scaled.to(self.value_dtype)  # round to nearest even
        out = torch.empty((*x.shape[:-1], x.shape[-1] + SCALE_BYTES), dtype=STORAGE_DTYPE)
        out = out.to(x.device)
        out[..., : x.shape[-1]] = values.view(STORAGE_DTYPE)
        out[..., x.shape[-1] :] = scale.view(STORAGE_DTYPE)
        return out

    def dequantize(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(..., head_dim + 2) packed rows -> (..., head_dim) in `dtype`. Any view of the pool
        (a gathered copy, a slice) works; nothing else of the pool is touched."""
        hd = rows.shape[-1] - SCALE_BYTES
        values = rows[..., :hd].view(self.value_dtype).to(torch.float32)
        scale = rows[..., hd:].view(torch.bfloat16).to(torch.float32)  # (..., 1)
        return (values * scale).to(dtype)


QUANTS = {
    "int8": KVQuant("int8", torch.int8, 127.0, 0),
    "fp8_e4m3": KVQuant("fp8_e4m3", torch.float8_e4m3fn, 448.0, 1),
}
assert set(QUANTS) | {"auto"} == set(KV_CACHE_DTYPES)
QUANTS_BY_WIRE_NAME = {q.wire_name: q for q in QUANTS.values()}


def kv_quant(kv_cache_dtype: str) -> KVQuant | None:
    """The format `--kv-cache-dtype` names; None for `auto` (the model's dtype)."""
    if kv_cache_dtype == "auto":
        return None
    if kv_cache_dtype not in QUANTS:
        raise ValueError(
            f"--kv-cache-dtype {kv_cache_dtype!r}: choose one of {', '.join(KV_CACHE_DTYPES)}"
        )
    return QUANTS[kv_cache_dtype]


def kv_row_bytes(head_dim: int, model_dtype: torch.dtype, kv_cache_dtype: str) -> int:
    """Bytes one token's K (or V) of one KV head takes in the pool."""
    quant = kv_quant(kv_cache_dtype)
    return head_dim * model_dtype.itemsize if quant is None else quant.row_width(head_dim)


def check_device(quant: KVQuant, head_dim: int, device: torch.device) -> None:
    """ValueError, in one line naming the flag, if this device can't hold or read the format."""
    if head_dim % 2:
        raise ValueError(
            f"--kv-cache-dtype {quant.name}: head_dim {head_dim} is odd; the scale after each "
            "row needs an even head_dim"
        )
    try:
        x = torch.linspace(-1, 1, 2 * head_dim, device=device).view(2, head_dim)
        back = quant.dequantize(quant.quantize(x), torch.float32)
        if not torch.allclose(back, x, atol=0.1):
            raise RuntimeError("values do not survive a round trip")
    except Exception as exc:  # an op this device's torch doesn't have
        raise ValueError(
            f"--kv-cache-dtype {quant.name} is not supported on {device}: "
            + " ".join(str(exc).split())[:200]
        ) from None


def kv_row(head_dim: int, kv_cache_dtype: str) -> int:
    """The pool's last axis: head_dim values, or a packed row's bytes."""
    quant = kv_quant(kv_cache_dtype)
    return head_dim if quant is None else quant.row_width(head_dim)


def kv_storage_dtype(model_dtype: torch.dtype, kv_cache_dtype: str) -> torch.dtype:
    """The pool's element dtype."""
    return model_dtype if kv_quant(kv_cache_dtype) is None else STORAGE_DTYPE


def kv_format_name(model_dtype: torch.dtype, kv_cache_dtype: str) -> str:
    """The pool's KV as named on the wire: the model dtype's name, or "kv_int8" / "kv_fp8_e4m3"."""
    quant = kv_quant(kv_cache_dtype)
    return str(model_dtype).removeprefix("torch.") if quant is None else quant.wire_name
