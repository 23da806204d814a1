"""Weight-only quantization at load (`--quantization int8|int4`): torch's int8/int4 kernels.

Decode is bound by the bytes of weights a step streams, so a weight kept at 1 byte (int8) or
about 0.6 (int4) instead of 4 (float32) is the cheapest speed-up there is. The kernels are the
ones torch ships for CPU, picked by measurement (`splitserve bench linear --backends ...` on
SmolLM2's shapes, docs/benchmarks.md): `torch._weight_int8pack_mm` and
`aten._weight_int4pack_mm_for_cpu`. Both are fast only with bfloat16 activations (with float32
ones torch runs a reference loop about 10x slower than oneDNN), so a float32 engine rounds each
linear's input to bfloat16 and its output comes back in bfloat16 precision; the residual stream,
norms, attention and logits stay float32.

- int8: per output channel, symmetric: w = q * s, q in -128..127, s = max|w| / 127 rounded to
  bfloat16 (the kernel takes its scales in the activation dtype; rounding them first means the
  bfloat16 and float32 paths use the same weights).
- int4: per group of `group_size` inputs of one output channel, asymmetric (min/max):
  w = (q - 8) * s + z, q in 0..15, s and z bfloat16, torch's int4 convention. The group size is
  32 by default (`INT4_GROUP_SIZE`, chosen by `splitserve bench quant`; 64 and 128 are also
  accepted by the kernel, 128 does not divide SmolLM2's 576-wide layers). A layer whose input
  width no allowed group divides, or whose output count is not a multiple of 16 after padding
  falls to int8 and says so.
- The LM head stays int8 under int4 (as llama.cpp's Q4 files keep theirs at Q6_K/Q8_0: the
  head is the most sensitive matmul), and the embedding table is int8 per row; a tied
  embedding looks its rows up in the head's int8 weight, so no float table is kept.

Where the kernels don't run (another device, a torch without them) the same quantized weights
are dequantized per call and multiplied in the engine dtype: correct, not fast.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("splitserve")

QUANTIZATIONS = ("none", "int8", "int4")
INT4_GROUP_SIZE = 32
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what torch's CPU int4 kernel accepts
_INT4_N_ALIGN = 16  # the CPU int4 packing wants output channels in multiples of 16


def check_quantization(method: str, group_size: int = INT4_GROUP_SIZE) -> None:
    if method not in QUANTIZATIONS:
        raise ValueError(
            f"unknown quantization {method!r}: use {', '.join(QUANTIZATIONS)} (--quantization)"
        )
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(
            f"int4 group size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}; "
            f"got {group_size}"
        )


def _bf16_round(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).float()


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (N, K), s float32 (N,)) with w ~= q * s per row; s is bfloat16-representable."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = _bf16_round(amax / 127)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


def quantize_int4(weight: torch.Tensor, group_size: int):
    """(q uint8 (N, K) in 0..15, s, z float32 (N, K/g)) with w ~= (q - 8) * s + z per group;
    s and z are bfloat16-representable."""
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"int4: {k} inputs are not a multiple of the group size {group_size}")
    w = weight.detach().float().reshape(n, k // group_size, group_size)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = _bf16_round((hi - lo) / _grid_steps(w, lo, hi))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = _bf16_round(lo + 8 * scale)
    q = torch.round((w - zero[..., None]) / scale[..., None]) + 8
    return q.clamp(0, 15).to(torch.uint8).reshape(n, k), scale, zero


def _grid_steps(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Per group, the steps (<= 15) between min and max of values already on a 4-bit grid
    (an AWQ/GPTQ or GGUF Q4 checkpoint, dequantized), else 15. Re-quantizing with the min-max
    scale of a group whose codes span only 0..13 would put every value on another grid and
    round it again; this keeps the checkpoint's own grid."""
    span = (hi - lo)[..., None]
    found = torch.full(lo.shape, 15.0)
    todo = torch.ones(lo.shape, dtype=torch.bool)
    safe = torch.where(span > 0, span, torch.ones_like(span))
    for m in range(15, 0, -1):
        r = (w - lo[..., None]) / safe * m
        fits = (r - r.round()).abs().amax(-1) < 1e-3
        found = torch.where(todo & fits, torch.full_like(found, m), found)
        todo &= ~fits
    return found


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    g = k // scale.shape[1]
    qf = q.float().reshape(n, k // g, g)
    return ((qf - 8) * scale[..., None] + zero[..., None]).reshape(n, k)


@functools.cache
def cpu_kernels_available() -> bool:
    """Whether this torch has the CPU int8/int4 weight-only kernels (checked once)."""
    try:
        q = torch.zeros(16, 32, dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        x = torch.zeros(1, 32, dtype=torch.bfloat16)
        sz = torch.zeros(1, 16, 2, dtype=torch.bfloat16)
        torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz)
        torch._weight_int8pack_mm(x, q.to(torch.int8), torch.ones(16, dtype=torch.bfloat16))
        return True
    except (RuntimeError, AttributeError, NotImplementedError) as exc:
        log.warning("torch's CPU int8/int4 kernels unavailable (%s); dequantizing per call", exc)
        return False


INT8_KERNEL_K_ALIGN = 16


class Int8Linear(nn.Module):
    """y = x (q * s)^T (+ b), q int8 per output channel. Inference only."""

    def __init__(self, linear: nn.Linear, use_kernel: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_int8(linear.weight)
        device = linear.weight.device
        self.register_buffer("qweight", q.to(device), persistent=False)
        self.register_buffer("scale", scale.to(device), persistent=False)
        self.register_buffer("scale_bf16", scale.to(device, torch.bfloat16), persistent=False)
        self.weight_bytes = q.numel() + 2 * scale.numel()
        # torch 2.13's kernel needs K to be a multiple of 16: otherwise it reads past the row
        # (a segfault on AVX2 below 8) or, on AVX-512/AMX CPUs with 2+ rows, gives wrong sums
        # or segfaults (K=104: both, depending on the row count).
        self.use_kernel = use_kernel and self.in_features % INT8_KERNEL_K_ALIGN == 0
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.use_kernel:
            out = torch._weight_int8pack_mm(
                x2.to(torch.bfloat16).contiguous(), self.qweight, self.scale_bf16
            ).to(x.dtype)
        else:
            out = F.linear(x2, self.dequantized().to(x.dtype))
        if self.bias is not None:
            out = out + self.bias
        return out.view(*lead, self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The float32 weight (N, K) this layer multiplies by."""
        return dequantize_int8(self.qweight, self.scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int4Linear(nn.Module):
    """y = x W^T (+ b), W in torch's CPU int4 packing, one scale and zero per group."""

    def __init__(self, linear: nn.Linear, group_size: int, use_kernel: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.group_size = group_size
        q, scale, zero = quantize_int4(linear.weight, group_size)
        n_pad = -(-self.out_features // _INT4_N_ALIGN) * _INT4_N_ALIGN
        if n_pad > q.shape[0]:  # zero rows, sliced off the output
            extra = n_pad - q.shape[0]
            q = torch.cat([q, q.new_full((extra, q.shape[1]), 8)])
            scale = torch.cat([scale, scale.new_ones((extra, scale.shape[1]))])
            zero = torch.cat([zero, zero.new_zeros((extra, zero.shape[1]))])
        self.use_kernel = use_kernel
        device = linear.weight.device
        if use_kernel:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
        else:  # two codes a byte, low nibble first
            packed = q[:, 0::2] | (q[:, 1::2] << 4)
        self.register_buffer("packed", packed.to(device), persistent=False)
        # (K/g, N, 2): what the kernel wants; bfloat16 holds them exactly (quantize_int4).
        sz = torch.stack([scale.t(), zero.t()], dim=-1).contiguous()
        self.register_buffer("scale_zeros", sz.to(device, torch.bfloat16), persistent=False)
        self.weight_bytes = packed.numel() + 2 * sz.numel()
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.use_kernel:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2.to(torch.bfloat16).contiguous(),
                self.packed,
                self.group_size,
                self.scale_zeros,
            )
            out = out[:, : self.out_features].to(x.dtype)
        else:
            out = F.linear(x2, self.dequantized().to(x.dtype))
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*lead, self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The float32 weight (N, K) this layer multiplies by."""
        sz = self.scale_zeros.float()
        scale, zero = sz[..., 0].t(), sz[..., 1].t()
        if self.use_kernel:
            # The packing is the kernel's own; x = I reads every weight back, one product each.
            eye = torch.eye(self.in_features, dtype=torch.float32, device=self.packed.device)
            w_t = torch.ops.aten._weight_int4pack_mm_for_cpu(
                eye, self.packed, self.group_size, self.scale_zeros.float()
            )
            return w_t.t()[: self.out_features].contiguous()
        q = torch.stack([self.packed & 15, self.packed >> 4], dim=-1).reshape(scale.shape[0], -1)
        return dequantize_int4(q, scale, zero)[: self.out_features]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"int4 g{self.group_size}"
        )


class Int8Embedding(nn.Module):
    """An embedding table in int8 per row. Tied to an int8 LM head it holds the head's own
    tensors (and counts no bytes of its own), so no float table is kept."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, shared: bool) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.register_buffer("qweight", qweight, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.weight_bytes = 0 if shared else qweight.numel() + 2 * scale.numel()
        self.out_dtype = torch.float32

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).to(torch.int64)
        rows = self.qweight[flat].to(self.out_dtype) * self.scale[flat, None].to(self.out_dtype)
        return rows.view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


def _int4_group(k: int, group_size: int) -> int | None:
    """The group size to use for k inputs: the one asked for, else a smaller allowed one."""
    for g in sorted((g for g in INT4_GROUP_SIZES if g <= group_size), reverse=True):
        if k % g == 0:
            return g
    return None


def quantize_linears(
    model: nn.Module,
    method: str,
    device: torch.device,
    dtype: torch.dtype,
    group_size: int = INT4_GROUP_SIZE,
) -> str:
    """Swap every nn.Linear and nn.Embedding below `model` for its quantized form; returns
    what was done, for the log."""
    from splitserve.model.block_linear import children_of_type

    check_quantization(method, group_size)
    use_kernel = device.type == "cpu" and cpu_kernels_available()
    counts = {"int8": 0, "int4": 0}
    by_weight: dict[int, Int8Linear] = {}
    for parent, name, child in children_of_type(model, nn.Linear):
        group = _int4_group(child.in_features, group_size)
        if method == "int4" and name != "lm_head" and group is not None:
            new: nn.Module = Int4Linear(child, group, use_kernel)
            counts["int4"] += 1
        else:
            if method == "int4" and name != "lm_head":
                log.warning("int4: %d inputs fit no group size; int8 there", child.in_features)
            new = Int8Linear(child, use_kernel)
            by_weight[id(child.weight)] = new
            counts["int8"] += 1
        setattr(parent, name, new)
    for parent, name, child in children_of_type(model, nn.Embedding):
        head = by_weight.get(id(child.weight))
        if head is not None:
            emb = Int8Embedding(head.qweight, head.scale, shared=True)
        else:
            q, scale = quantize_int8(child.weight)
            device = child.weight.device
            emb = Int8Embedding(q.to(device), scale.to(device), shared=False)
        emb.out_dtype = dtype
        setattr(parent, name, emb)
    kernel = "torch CPU kernels" if use_kernel else "dequantized per call"
    return f"{counts['int4']} linears int4, {counts['int8']} int8 ({kernel}), embedding int8"


QUANT_MODULES = (Int8Linear, Int4Linear, Int8Embedding)
