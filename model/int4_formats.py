"""The packed int4 layouts of AWQ and GPTQ checkpoints as published on the Hugging Face hub.

Both store, per linear `prefix`, `prefix.qweight` / `prefix.qzeros` (int32, eight 4-bit codes
each) and `prefix.scales` (float16), and a weight is w = (q - z) * s per group of `group_size`
inputs of one output channel. They differ in how the codes are packed:

- AWQ (AutoAWQ "gemm" version): the weight is kept input-major, qweight (K, N/8): each int32
  holds 8 consecutive output channels in AWQ's interleaved order (nibble i holds channel
  `AWQ_ORDER[i]`: 0, 2, 4, 6, 1, 3, 5, 7); qzeros (K/g, N/8) packed the same way; scales
  (K/g, N). Zeros are stored as they are.
- GPTQ (AutoGPTQ / GPTQModel, checkpoint_format "gptq", v1): qweight (K/8, N) packs 8
  consecutive *input* rows into each int32 (nibble j = input 8r + j); qzeros (G, N/8) packs 8
  consecutive output channels in plain order and stores z - 1 (the v1 convention; "gptq_v2"
  stores z); scales (G, N); g_idx (K,) int32 names each input's group (i // g without act-order).

Everything here is exact integer work: `dequantize_*` returns (q - z) * s in float32, one
rounding-free product per weight (|q - z| <= 15 times a float16 fits float32 exactly).
"""

from __future__ import annotations

import torch

from splitserve.engine.config import ModelLoadError

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ int32 holds channel AWQ_ORDER[i]
AWQ_REVERSE = (0, 4, 1, 5, 2, 6, 3, 7)  # channel c sits in nibble AWQ_REVERSE[c]
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(..., 8n) codes 0..15 -> (..., n) int32, code 8i + j in nibble j (two's complement)."""
    c = codes.to(torch.int64).reshape(*codes.shape[:-1], -1, 8)
    packed = (c << _SHIFTS.to(torch.int64)).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_nibbles`: (..., n) int32 -> (..., 8n) int64 codes."""
    nib = (packed.to(torch.int64)[..., None] >> _SHIFTS.to(torch.int64)) & 15
    return nib.reshape(*packed.shape[:-1], -1)


def _order(codes: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """Reorder the last dim within each run of 8: out[..., 8i + j] = codes[..., 8i + order[j]]."""
    c = codes.reshape(*codes.shape[:-1], -1, 8)
    return c[..., list(order)].reshape(codes.shape)


# ---- AWQ ------------------------------------------------------------------------------------
def pack_awq(q: torch.Tensor, z: torch.Tensor, s: torch.Tensor):
    """q (N, K), z (N, K/g) codes 0..15, s (N, K/g) float16 -> (qweight, qzeros, scales)."""
    qweight = pack_nibbles(_order(q.t().contiguous(), AWQ_ORDER))  # (K, N/8)
    qzeros = pack_nibbles(_order(z.t().contiguous(), AWQ_ORDER))  # (K/g, N/8)
    return qweight, qzeros, s.t().contiguous().to(torch.float16)


def dequantize_awq(name: str, qweight, qzeros, scales, group_size: int) -> torch.Tensor:
    """The float32 weight (N, K) of an AWQ linear; bad shapes or dtypes name the tensor."""
    _check_dtype(name, qweight=qweight, qzeros=qzeros)
    if qweight.dim() != 2 or scales.dim() != 2 or qzeros.dim() != 2:
        raise ModelLoadError(f"{name}.qweight/qzeros/scales: AWQ tensors are 2-D")
    k, n = qweight.shape[0], qweight.shape[1] * 8
    groups = _groups(name, k, group_size)
    _check_shape(f"{name}.scales", scales, (groups, n))
    _check_shape(f"{name}.qzeros", qzeros, (groups, n // 8))
    q = _order(unpack_nibbles(qweight), AWQ_REVERSE)  # (K, N)
    z = _order(unpack_nibbles(qzeros), AWQ_REVERSE)  # (K/g, N)
    idx = torch.arange(k) // group_size
    return ((q - z[idx]).float() * scales.float()[idx]).t().contiguous()


# ---- GPTQ -----------------------------------------------------------------------------------
def pack_gptq(q: torch.Tensor, z: torch.Tensor, s: torch.Tensor, group_size: int, v1: bool = True):
    """q (N, K), z (N, K/g) codes, s (N, K/g) -> (qweight, qzeros, scales, g_idx)."""
    k = q.shape[1]
    qweight = pack_nibbles(q.contiguous()).t().contiguous()  # (K/8, N): along inputs
    stored = z - 1 if v1 else z  # v1: zero minus one (z = 0 wraps to 15, as the tools do)
    qzeros = pack_nibbles((stored & 15).t().contiguous())  # (G, N/8)
    g_idx = (torch.arange(k) // group_size).to(torch.int32)
    return qweight, qzeros, s.t().contiguous().to(torch.float16), g_idx


def dequantize_gptq(name: str, qweight, qzeros, scales, g_idx, v1: bool = True) -> torch.Tensor:
    """The float32 weight (N, K) of a GPTQ linear; bad shapes or dtypes name the tensor."""
    _check_dtype(name, qweight=qweight, qzeros=qzeros)
    if qweight.dim() != 2 or scales.dim() != 2 or qzeros.dim() != 2:
        raise ModelLoadError(f"{name}.qweight/qzeros/scales: GPTQ tensors are 2-D")
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    groups = scales.shape[0]
    _check_shape(f"{name}.scales", scales, (groups, n))
    _check_shape(f"{name}.qzeros", qzeros, (groups, n // 8))
    _check_shape(f"{name}.g_idx", g_idx, (k,))
    idx = g_idx.to(torch.int64)
    if k and (int(idx.min()) < 0 or int(idx.max()) >= groups):
        raise ModelLoadError(f"{name}.g_idx: group indices outside 0..{groups - 1}")
    q = unpack_nibbles(qweight.t().contiguous()).t()  # (K, N)
    z = unpack_nibbles(qzeros)  # (G, N)
    if v1:
        z = (z + 1) & 15
    return ((q - z[idx]).float() * scales.float()[idx]).t().contiguous()


# ---- checks ---------------------------------------------------------------------------------
def _check_dtype(name: str, **tensors: torch.Tensor) -> None:
    for part, t in tensors.items():
        if t.dtype != torch.int32:
            raise ModelLoadError(f"{name}.{part}: expected int32 packed codes, got {t.dtype}")


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise ModelLoadError(f"{name}: shape {tuple(t.shape)}, expected {shape}")


def _groups(name: str, k: int, group_size: int) -> int:
    if group_size <= 0 or k % group_size:
        raise ModelLoadError(f"{name}.qweight: {k} inputs are not a multiple of group {group_size}")
    return k // group_size
