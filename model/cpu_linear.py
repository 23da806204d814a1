"""Linear layers on CPU through oneDNN with weights packed once, at load.

`nn.Linear` on CPU calls a BLAS gemm that re-reads the weight in its plain row-major layout on
every call. oneDNN can reorder a weight once into the blocked layout its kernels want; the
packed matmul is then about 2x faster for the shapes a decode step has (a few to a few hundred
rows against a 576-wide model), and still faster for 2048-row prefills, in float32 and
bfloat16 alike (`splitserve bench engine` shows the end-to-end effect). The results are plain
float32 (or bfloat16) matmuls, not reduced precision: only the order of the additions differs.

`pack_linears` swaps every `nn.Linear` of a loaded model for a `PackedLinear` holding the
packed weight and drops the dense one, so memory does not grow, except for a tied LM head:
the embedding keeps the dense table for its lookups and the head gets a packed copy (under
'blocks' the embedding looks its rows up in the head's tiles instead, and the table goes).
'auto' packs when the device is the CPU and this torch build has the oneDNN ops; 'torch'
never packs; 'onednn' packs or fails. 'blocks' and 'auto' first keep every weight that came
from a GGUF checkpoint in its blocks (model/block_linear.py), then pack the rest.
'blocks-int8' keeps the same blocks and multiplies them as llama.cpp does, with the
activations rounded to int8 per block of 32 and VNNI integer dot products: 2-5x faster at
decode batch sizes, no longer float32-exact (docs/benchmarks.md measures the quality).
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from splitserve.model import block_linear, quant_linear

log = logging.getLogger("splitserve")

LINEAR_BACKENDS = ("auto", "torch", "onednn", "blocks", "blocks-int8")


@functools.cache
def onednn_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch build can pack and run a `dtype` linear through oneDNN on this CPU
    (checked once per dtype: bfloat16 needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT)."""
    try:
        w = torch.ones(8, 4, dtype=dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        x = torch.ones(2, 4, dtype=dtype)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        return bool(torch.equal(out, torch.full((2, 8), 4.0, dtype=dtype)))
    except Exception as exc:  # an op missing from this build, a CPU oneDNN refuses, ...
        why = (str(exc).splitlines() or [type(exc).__name__])[0]
        log.warning("oneDNN %s linear unavailable (%s); using torch's", dtype, why)
        return False


class PackedLinear(nn.Module):
    """y = x W^T (+ b) with W reordered once for oneDNN. Inference only."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = weight.dtype
        self.weight_bytes = weight.numel() * weight.element_size()
        # An opaque oneDNN tensor: a plain attribute, not a parameter or buffer, so
        # `.to()`/`state_dict()` never try to move or copy it.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        out = torch.ops.mkldnn._linear_pointwise(x2, self.packed, self.bias, "none", [], "")
        return out.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, onednn"


def use_onednn(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    if backend not in LINEAR_BACKENDS:
        raise ValueError(f"unknown linear backend {backend!r}: use {', '.join(LINEAR_BACKENDS)}")
    if backend == "torch":
        return False
    supported = device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
    if backend == "onednn" and not supported:
        raise ValueError(
            f"the oneDNN linear backend runs float32/bfloat16 on CPU, not {dtype} on {device}"
        )
    if not supported:
        return False
    if not onednn_available(dtype):
        if backend == "onednn":
            raise RuntimeError(
                f"the oneDNN linear ops can't run {dtype} with this torch build on this CPU"
            )
        return False
    return True


def use_blocks(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether to keep block-quantized weights in blocks (model/block_linear.py): asked for,
    or 'auto' on a CPU running float32 where the AVX-512 kernel builds."""
    if backend not in ("auto", "blocks", "blocks-int8"):
        return False
    supported = device.type == "cpu" and dtype == torch.float32
    if backend != "auto" and not supported:
        raise ValueError(
            f"the {backend} linear backend runs float32 on CPU, not {dtype} on {device}"
        )
    if not supported:
        return False
    if backend != "auto":
        mod = block_linear.load_kernel()
        if mod is None:
            raise RuntimeError("the block-quantized linear kernel could not be built here")
        if backend == "blocks-int8" and mod.int8_path() == "portable":
            log.warning(
                "--linear-backend blocks-int8: this CPU has neither AVX-512 VNNI nor AVX2; "
                "the int8 products run in a portable loop (same numbers, much slower)"
            )
        if backend == "blocks" and not mod.has_avx512():
            # Measured on a 2-vCPU AVX2-only EPYC: blocks 3.1 tok/s, auto (oneDNN) 12.8,
            # blocks-int8 (its AVX2 kernel) 49.
            log.warning(
                "--linear-backend blocks: without AVX-512 the float32 block kernel runs a "
                "portable loop (same numbers, several times slower than 'auto'); "
                "blocks-int8 has an AVX2 kernel"
            )
        return True
    return block_linear.kernel_usable()


def prepare_linears(
    model: nn.Module,
    backend: str,
    device: torch.device,
    dtype,
    quantization: str = "none",
    group_size: int = quant_linear.INT4_GROUP_SIZE,
) -> str:
    """Swap the model's linears for `backend`'s; returns what was done, for the log.

    With `quantization` int8/int4 every linear and embedding is quantized at load
    (model/quant_linear.py) and `backend` only has to be a known one. Otherwise 'blocks' (and
    'auto' where it can) keeps each weight in the file's GGUF blocks (or, from a float
    checkpoint, one that re-encodes exactly as Q4_1/Q8_0);
    every other linear is packed for oneDNN when that is available, else left as is.
    """
    try:
        return _prepare(model, backend, device, dtype, quantization, group_size)
    finally:
        if hasattr(model, "stored_blocks"):
            model.stored_blocks.clear()  # views of the file map and their copies


def _prepare(model, backend, device, dtype, quantization, group_size) -> str:
    if quantization not in ("none", "auto"):  # "auto" unresolved (no checkpoint): none
        if backend not in LINEAR_BACKENDS:
            raise ValueError(
                f"unknown linear backend {backend!r}: use {', '.join(LINEAR_BACKENDS)}"
            )
        return quant_linear.quantize_linears(model, quantization, device, dtype, group_size)
    blocks = 0
    if use_blocks(backend, device, dtype):
        blocks = block_linear.block_linears(model, int8=backend == "blocks-int8")
    packed = pack_linears(model) if use_onednn(backend, device, dtype) else 0
    if backend.startswith("blocks") and not blocks:
        log.warning(
            "--linear-backend %s: no weight came in GGUF blocks, and no weight re-encodes exactly",
            backend,
        )
    kinds = sorted(
        {
            block_linear.FORMAT_NAMES[f]
            for m in model.modules()
            if isinstance(m, block_linear.BlockLinear)
            for f in m.formats
        }
    )
    embeds = sum(isinstance(m, block_linear.BlockEmbedding) for m in model.modules())
    in_blocks = f" and {embeds} embedding" if embeds else ""
    fmts = "/".join(kinds) + " " if kinds else ""
    how = " (int8 activations)" if backend == "blocks-int8" and blocks else ""
    return f"{blocks} linears{in_blocks} in {fmts}blocks{how}, {packed} packed for oneDNN"


def pack_linears(model: nn.Module) -> int:
    """Replace every nn.Linear below `model` by a PackedLinear; returns how many."""
    swaps = block_linear.children_of_type(model, nn.Linear)
    for parent, name, child in swaps:
        setattr(parent, name, PackedLinear(child))
    return len(swaps)


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of weights the packed layers hold (their dense parameters are gone)."""
    kinds = (PackedLinear, block_linear.BlockLinear, block_linear.BlockEmbedding)
    kinds += quant_linear.QUANT_MODULES
    return sum(m.weight_bytes for m in model.modules() if isinstance(m, kinds))


def matmul_weight_bytes(model: nn.Module) -> int:
    """Bytes a forward reads through the model's linears, as they are stored (fp32, bf16,
    oneDNN-packed, 4-/8-bit blocks or quantized at load): what a decode step streams besides
    the KV."""
    total = 0
    kinds = (
        PackedLinear,
        block_linear.BlockLinear,
        quant_linear.Int8Linear,
        quant_linear.Int4Linear,
    )
    for m in model.modules():
        if isinstance(m, kinds):
            total += m.weight_bytes
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total
