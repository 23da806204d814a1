"""A C++ paged decode kernel for CPU (model/csrc/paged_decode.cpp), built on first use.

The torch backend gathers every decode's blocks into a batch padded to the longest sequence
and runs SDPA over it; the kernel instead streams each sequence's own blocks once, in place,
with no padding. It is compiled with torch's cpp_extension (cached under
~/.cache/torch_extensions) the first time it is asked for; if the compiler or headers are
missing the engine logs once and stays on the torch backend, which gives the same results.
"""

from __future__ import annotations

import functools

import torch

from splitserve.model import cpp_ext
from splitserve.model.attention import AttentionMetadata, torch_paged_attention
from splitserve.model.kv_quant import KVQuant

_module = None


def load_kernel():
    """The compiled module, or None if it can't be built here."""
    global _module
    _module = cpp_ext.build(
        "splitserve_paged_decode",
        "paged_decode.cpp",
        ["-O3", "-march=native", "-ffast-math", "-fopenmp"],
        "C++ attention kernel",
    )
    return _module


def cpp_decode(
    q, k_cache, v_cache, meta: AttentionMetadata, scale: float, quant: KVQuant | None = None
) -> torch.Tensor:
    tables, lens = meta.decode_block_tables, meta.decode_context_lens
    if quant is None:
        return _module.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale)
    return _module.paged_decode_attention_packed(
        q, k_cache, v_cache, tables, lens, scale, quant.code
    )


def _writing_args(q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> tuple:
    return (
        q,
        k,
        v,
        k_cache,
        v_cache,
        meta.slot_mapping,
        meta.decode_block_tables,
        meta.decode_context_lens,
        scale,
    )


def cpp_decode_writing(q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float):
    """A decode-only step in one call: this step's K/V rows into their slots, then
    `cpp_decode` (the fused decoder loop uses it when the backend offers it)."""
    return _module.paged_decode_attention_writing(
        *_writing_args(q, k, v, k_cache, v_cache, meta, scale)
    )


def cpp_decode_writing_packed(
    q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, quant: KVQuant
):
    """`cpp_decode_writing` for an int8/fp8 pool: this step's K/V rows packed into their slots
    byte for byte as `quant.quantize` packs them, then the packed kernel, in one call."""
    return _module.paged_decode_attention_packed_writing(
        *_writing_args(q, k, v, k_cache, v_cache, meta, scale), quant.code
    )


# Which of block_linear.cpp's DecoderStack kinds a writer stands for (model/fused_decode.py):
# -1 the float pool's; a packed writer carries its pool's KVQuant.code.
cpp_decode_writing.kv_format = -1


def select_backend(name: str, device: torch.device, quant: KVQuant | None = None):
    """'torch', 'cpp', or 'auto' (cpp on CPU when it builds, else torch); reading a pool in
    `quant`'s format when given one."""
    if name not in ("auto", "torch", "cpp"):
        raise ValueError(f"unknown attention backend {name!r}: use auto, torch or cpp")
    if name == "torch" or device.type != "cpu":
        chosen = torch_paged_attention
    elif load_kernel() is None:
        if name == "cpp":
            raise RuntimeError("the C++ attention kernel could not be built on this machine")
        chosen = torch_paged_attention
    else:
        chosen = functools.partial(torch_paged_attention, decode=cpp_decode)
        # what the fused decoder calls for a step of decodes only
        chosen.decode_writing = cpp_decode_writing
    if quant is None:
        return chosen
    packed = functools.partial(chosen, quant=quant)
    if getattr(chosen, "decode_writing", None) is not None:
        writing = functools.partial(cpp_decode_writing_packed, quant=quant)
        writing.kv_format = quant.code
        packed.decode_writing = writing
    return packed
