"""GGUF checkpoints: llama.cpp metadata to a Hugging Face config dict, tensors to HF names.

The file is parsed by model/gguf_file.py and memory-mapped; a tensor is dequantized to float32
only when the caller reaches it. Two llama.cpp conventions are undone here so that what we yield
is exactly what `transformers` would load: GGUF lists dimensions innermost first (we yield HF
`[out, in]`), and `convert_hf_to_gguf.py` interleaves the rows of q_proj/k_proj of
llama-architecture models for its rotary kernel (qwen2 is stored unpermuted).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from splitserve.engine.config import ModelConfig
from splitserve.engine.tokenizer import Tokenizer
from splitserve.model.gguf_file import GGUFFile, GGUFTensor
from splitserve.model.loader import (
    Checkpoint,
    ModelLoadError,
    Region,
    StoredBlocks,
    TensorRef,
    cut,
)

GGUF_MAGIC = b"GGUF"

Q = GGMLQuantizationType
SUPPORTED_TENSOR_TYPES = frozenset(
    {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K}
)

# GGUF `general.architecture` -> HF `model_type`. Mistral GGUFs declare "llama".
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2"}
PERMUTED_QK_ARCHS = frozenset({"llama"})

GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Derived data llama.cpp stores for its own kernels; the config already says the same thing.
IGNORED_TENSORS = frozenset({"rope_freqs.weight"})


def has_gguf_magic(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e.strerror or e}") from e


def gguf_to_hf_name(name: str) -> str | None:
    """The HF parameter name for a GGUF tensor name, or None if it has no HF counterpart."""
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    m = BLOCK_RE.fullmatch(name)
    if m is None or m.group(2) not in BLOCK_NAMES:
        return None
    return f"model.layers.{m.group(1)}.{BLOCK_NAMES[m.group(2)]}.{m.group(3)}"


def permute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's `LlamaModel.permute`: each head's rows from halves-split to interleaved."""
    rows = weight.shape[0]
    # (n_head, 2, head_dim/2, ...) -> (n_head, head_dim/2, 2, ...)
    w = weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
    return w.transpose(1, 2).reshape(weight.shape)


def unpermute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `permute_qk`: back to the HF (rotate-half) row order."""
    rows = weight.shape[0]
    # (n_head, head_dim/2, 2, ...) -> (n_head, 2, head_dim/2, ...)
    w = weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:])
    return w.transpose(1, 2).reshape(weight.shape)


def dequantize_tensor(tensor: GGUFTensor) -> torch.Tensor:
    """A GGUF tensor as a float32 CPU tensor in HF shape (outermost dimension first)."""
    qtype = GGMLQuantizationType(tensor.tensor_type)
    if qtype not in SUPPORTED_TENSOR_TYPES:
        raise ModelLoadError(f"tensor {tensor.name} has unsupported GGUF type {qtype.name}")
    values = dequantize(np.asarray(tensor.data), qtype)
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    # Copies only a view of the read-only memory map (F32), which torch cannot wrap;
    # dequantized arrays are fresh and used as they are, so peak memory stays one tensor.
    values = np.require(values, dtype=np.float32, requirements=["C", "W"])
    return torch.from_numpy(values.reshape(shape))


def read_metadata(reader: GGUFFile) -> dict[str, Any]:
    """Every key/value field as plain Python values (strings, numbers, lists)."""
    return dict(reader.metadata)


def open_gguf(path: str) -> Checkpoint:
    reader = _open_reader(path)
    try:
        metadata = read_metadata(reader)
    except (ValueError, UnicodeDecodeError, IndexError) as e:
        raise ModelLoadError(f"{path}: corrupt GGUF metadata ({e})") from e
    hf_config = hf_config_from_gguf(metadata, reader)  # first: names the architecture
    tensors = _tensors_by_hf_name(reader, path)
    try:
        config = ModelConfig.from_hf(hf_config, name=_model_name(path))
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{path}: unsupported or incomplete GGUF metadata ({e})") from e
    tokenizer = Tokenizer.from_gguf_metadata(metadata)

    def source(names: set[str] | None) -> Iterator[tuple[str, torch.Tensor]]:
        for hf_name, tensor in tensors.items():
            if names is None or hf_name in names:
                yield hf_name, _load_tensor(tensor, hf_name, config)

    def refs() -> Iterator[tuple[str, TensorRef]]:
        for hf_name, tensor in tensors.items():
            shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
            reader = functools.partial(_read_region, tensor, hf_name, config)
            blocks = functools.partial(_read_blocks, tensor, hf_name, config)
            yield hf_name, TensorRef(shape, reader, blocks)

    return Checkpoint(
        path, config, tokenizer, len(tensors), source, refs, _drop_pages=reader.drop_pages
    )


def _open_reader(path: str) -> GGUFFile:
    try:
        reader = GGUFFile(path)
    except (ValueError, OSError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as e:
        raise ModelLoadError(
            f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})"
        ) from e
    size = os.path.getsize(path)
    for t in reader.tensors:
        # The reader maps whatever is there; a short file would fail only when a tensor is read.
        if t.data_offset + t.n_bytes > size or t.data.size * t.data.itemsize != t.n_bytes:
            raise ModelLoadError(f"{path}: truncated GGUF file (tensor {t.name} is cut off)")
    return reader


def _tensors_by_hf_name(reader: GGUFFile, path: str) -> dict[str, GGUFTensor]:
    tensors: dict[str, GGUFTensor] = {}
    for t in reader.tensors:
        if t.name in IGNORED_TENSORS:
            continue
        hf_name = gguf_to_hf_name(t.name)
        if hf_name is None:
            raise ModelLoadError(f"{path}: unexpected tensor {t.name}; unsupported architecture")
        qtype = GGMLQuantizationType(t.tensor_type)
        if qtype not in SUPPORTED_TENSOR_TYPES:
            supported = ", ".join(sorted(q.name for q in SUPPORTED_TENSOR_TYPES))
            raise ModelLoadError(
                f"{path}: tensor {t.name} uses GGUF type {qtype.name}; supported: {supported}"
            )
        tensors[hf_name] = t
    return tensors


def _load_tensor(tensor: GGUFTensor, hf_name: str, config: ModelConfig) -> torch.Tensor:
    weight = dequantize_tensor(tensor)
    heads = _qk_heads(hf_name, config)
    return weight if heads is None else unpermute_qk(weight, heads)


def _qk_heads(hf_name: str, config: ModelConfig) -> int | None:
    """Heads of a q/k weight whose rows llama.cpp stored interleaved, else None."""
    if config.architecture not in PERMUTED_QK_ARCHS or not hf_name.endswith(".weight"):
        return None
    if ".q_proj." in hf_name:
        return config.num_heads
    if ".k_proj." in hf_name:
        return config.num_kv_heads
    return None


def _read_region(
    tensor: GGUFTensor, hf_name: str, config: ModelConfig, rows: Region, cols: Region
) -> torch.Tensor:
    """Rows and columns of a tensor, reading (and dequantizing) only those bytes of the file:
    whole rows are contiguous, and columns are whole quantization blocks when the cut falls
    on the block grid (otherwise the rows are dequantized and then cut)."""
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    heads = _qk_heads(hf_name, config)
    hd = config.head_dim
    aligned = rows is None or heads is None or (rows[0] % hd == 0 and rows[1] % hd == 0)
    if len(shape) != 2 or (rows is None and cols is None) or not aligned:
        return cut(_load_tensor(tensor, hf_name, config), rows, cols)
    qtype = GGMLQuantizationType(tensor.tensor_type)
    raw, cols_cut = _raw_part(tensor, shape, rows, cols)
    after = None if cols_cut else cols
    values = dequantize(np.ascontiguousarray(raw), qtype)
    values = np.require(values, dtype=np.float32, requirements=["C", "W"])
    weight = cut(torch.from_numpy(values.reshape(raw.shape[0], -1)), None, after)
    if heads is not None:
        # Row p of head h moved within the head only, so a cut on head boundaries is undone
        # head by head.
        weight = unpermute_qk(weight, weight.shape[0] // hd)
    return weight


def _raw_part(
    tensor: GGUFTensor, shape: tuple[int, ...], rows: Region, cols: Region
) -> tuple[np.ndarray, bool]:
    """The file's bytes of `rows` (a view): of `cols` only when the cut falls on the type's
    block grid, else of whole rows. The flag says whether `cols` was applied (or is None).
    A row of a GGUF tensor is always whole blocks, so its end is on the grid."""
    block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(tensor.tensor_type)]
    raw = np.asarray(tensor.data).view(np.uint8).reshape(shape[0], -1)
    if rows is not None:
        raw = raw[rows[0] : rows[1]]
    if cols is None:
        return raw, True
    if cols[0] % block or cols[1] % block:
        return raw, False
    return raw[:, cols[0] // block * block_bytes : cols[1] // block * block_bytes], True


def _read_blocks(
    tensor: GGUFTensor, hf_name: str, config: ModelConfig, rows: Region, cols: Region
) -> StoredBlocks | None:
    """The same part `_read_region` reads, as the file's blocks (no copy unless q/k rows must
    be un-interleaved); None for float tensors and for cuts off the block grid."""
    qtype = GGMLQuantizationType(tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    if qtype in (Q.F32, Q.F16, Q.BF16) or qtype not in SUPPORTED_TENSOR_TYPES or len(shape) != 2:
        return None
    heads = _qk_heads(hf_name, config)
    r0, r1 = rows if rows is not None else (0, shape[0])
    c0, c1 = cols if cols is not None else (0, shape[1])
    if heads is not None and (r0 % config.head_dim or r1 % config.head_dim):
        return None
    raw, cols_cut = _raw_part(tensor, shape, rows, cols)
    if not cols_cut:
        return None
    if heads is not None:  # the same row moves as unpermute_qk, on bytes
        raw = unpermute_qk(torch.from_numpy(np.array(raw)), (r1 - r0) // config.head_dim).numpy()
    return StoredBlocks(int(qtype), raw, (r1 - r0, c1 - c0))


def _model_name(path: str) -> str:
    # The file's name, not `general.name`: two quantizations of one model share the latter,
    # and the model id seeds the KV cache keys, which must differ when the weights do.
    return os.path.splitext(os.path.basename(path))[0]


def hf_config_from_gguf(metadata: dict[str, Any], reader: GGUFFile) -> dict[str, Any]:
    """Translate llama.cpp's `{arch}.*` keys into a `config.json`-style dict."""
    arch = metadata.get("general.architecture")
    if arch not in MODEL_TYPES:
        raise ModelLoadError(
            f"unsupported GGUF architecture {arch!r}; supported: {', '.join(MODEL_TYPES)}"
        )

    def key(name: str, default: Any = None) -> Any:
        return metadata.get(f"{arch}.{name}", default)

    tensor_names = {t.name for t in reader.tensors}
    hidden, num_heads = key("embedding_length"), key("attention.head_count")
    if hidden is None or num_heads is None or key("block_count") is None:
        raise ModelLoadError(f"GGUF metadata lacks the {arch}.* shape keys")
    head_dim = key("attention.key_length") or hidden // num_heads
    if key("rope.dimension_count", head_dim) != head_dim:
        raise ModelLoadError("partial rotary embeddings (rope.dimension_count) are unsupported")
    cfg: dict[str, Any] = {
        "model_type": MODEL_TYPES[arch],
        "vocab_size": key("vocab_size") or len(metadata.get("tokenizer.ggml.tokens", ())),
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": _uniform(key("attention.head_count_kv", num_heads)),
        "head_dim": head_dim,
        "max_position_embeddings": key("context_length", 4096),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": key("rope.freq_base", 10000.0),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
    }
    if not cfg["vocab_size"] and "token_embd.weight" in tensor_names:
        cfg["vocab_size"] = int(_tensor(reader, "token_embd.weight").shape[-1])
    rope_scaling = _rope_scaling(key, reader, head_dim, cfg["rope_theta"])
    if rope_scaling is not None:
        cfg["rope_scaling"] = rope_scaling
    return cfg


def _uniform(value: Any) -> int:
    """A per-layer count stored as a list must be one value for the models we run."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ModelLoadError("per-layer KV head counts are unsupported")
        return int(value[0])
    return int(value)


def _tensor(reader: GGUFFile, name: str) -> GGUFTensor:
    return next(t for t in reader.tensors if t.name == name)


def _rope_scaling(key: Any, reader: GGUFFile, head_dim: int, theta: float) -> dict | None:
    """Llama-3 RoPE scaling, from explicit keys or recovered from the `rope_freqs` tensor.

    llama.cpp's converter writes no llama3 keys: it bakes the per-frequency divisors into
    `rope_freqs.weight`. We rebuild the HF parameters from that tensor, trying the values every
    released Llama 3.x uses for the parts the tensor does not pin down, and check the result.
    """
    kind = key("rope.scaling.type", "none")
    if kind not in ("none", "llama3"):
        raise ModelLoadError(f"unsupported RoPE scaling type {kind!r}")
    original = key("rope.scaling.original_context_length", 8192)
    if kind == "llama3":
        return {
            "rope_type": "llama3",
            "factor": key("rope.scaling.factor"),
            "low_freq_factor": key("rope.scaling.low_freq_factor", 1.0),
            "high_freq_factor": key("rope.scaling.high_freq_factor", 4.0),
            "original_max_position_embeddings": original,
        }
    if not any(t.name == "rope_freqs.weight" for t in reader.tensors):
        return None
    stored = dequantize_tensor(_tensor(reader, "rope_freqs.weight")).double()
    params = {
        "rope_type": "llama3",
        "factor": float(stored.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": int(original),
    }
    expected = llama3_rope_divisors(params, head_dim, theta)
    if expected.shape != stored.shape or not torch.allclose(expected, stored, rtol=1e-4):
        raise ModelLoadError("rope_freqs.weight does not match a Llama-3 RoPE scaling")
    return params


def llama3_rope_divisors(params: dict[str, Any], head_dim: int, theta: float) -> torch.Tensor:
    """What llama.cpp stores in `rope_freqs.weight`: inv_freq is divided by these, per pair."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * torch.pi / inv_freq
    old_ctx, factor = params["original_max_position_embeddings"], params["factor"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    divisors = torch.where(wavelen > old_ctx / low, torch.full_like(mid, factor), mid)
    return torch.where(wavelen < old_ctx / high, torch.ones_like(mid), divisors)
