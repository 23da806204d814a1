"""A tiny llama GGUF file in every tensor type the loader reads, for loader and kernel tests."""

from __future__ import annotations

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from splitserve.engine.tokenizer import byte_alphabet
from splitserve.model.gguf_loader import permute_qk
from splitserve.model.loader import StoredBlocks

HIDDEN, FFN, HEADS, KV_HEADS, VOCAB, LAYERS = 64, 256, 4, 2, 256, 2
HEAD_DIM = HIDDEN // HEADS
# Largest error each type may add on N(0, 1) weights; exactness is checked separately.
TOLERANCE = {Q.F32: 0, Q.F16: 2e-3, Q.BF16: 2e-2, Q.Q8_0: 4e-2, Q.Q5_0: 0.25, Q.Q5_1: 0.25,
             Q.Q4_0: 0.5, Q.Q4_1: 0.5}  # fmt: skip
# (gguf block name, HF module, [out, in], type in layer 0, type in layer 1)
LAYER_TENSORS = [
    ("attn_q", "self_attn.q_proj", (HIDDEN, HIDDEN), Q.F32, Q.Q8_0),
    ("attn_k", "self_attn.k_proj", (KV_HEADS * HEAD_DIM, HIDDEN), Q.F16, Q.Q4_0),
    ("attn_v", "self_attn.v_proj", (KV_HEADS * HEAD_DIM, HIDDEN), Q.Q4_1, Q.Q5_0),
    ("attn_output", "self_attn.o_proj", (HIDDEN, HIDDEN), Q.BF16, Q.Q5_1),
    ("ffn_gate", "mlp.gate_proj", (FFN, HIDDEN), Q.Q8_0, Q.F16),
    ("ffn_up", "mlp.up_proj", (FFN, HIDDEN), Q.Q4_0, Q.BF16),
    ("ffn_down", "mlp.down_proj", (HIDDEN, FFN), Q.Q4_K, Q.Q6_K),  # K-quants need 256-wide rows
]
K_TYPES = (Q.Q4_K, Q.Q5_K, Q.Q6_K)
NORMS = [("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")]
BIASES = [("attn_q", "q_proj", HIDDEN), ("attn_k", "k_proj", KV_HEADS * HEAD_DIM)]


def raw_k_quant(rows: int, cols: int, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """gguf cannot quantize to K-types, so write random blocks with sane f16 scales."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block_size, type_size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    if qtype in (Q.Q4_K, Q.Q5_K):  # d and dmin lead the block
        raw[..., 0:2], raw[..., 2:4] = scale, scale
    else:  # Q6_K: d ends the block
        raw[..., -2:] = scale
    return raw.reshape(rows, -1)


def write_tiny_gguf(path: str, arch: str = "llama", rope_freqs: np.ndarray | None = None) -> dict:
    """A 2-layer model in mixed tensor types; returns `{hf_name: (expected tensor, tolerance)}`."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name("tiny")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(list(byte_alphabet().values()))
    writer.add_token_merges([])
    writer.add_eos_token_id(0)
    expected: dict[str, tuple[torch.Tensor, float]] = {}

    def add(name: str, hf_name: str, weight: np.ndarray, qtype: Q, n_head: int = 0) -> None:
        stored = weight
        if n_head and arch == "llama":  # what convert_hf_to_gguf.py does to q/k rows
            stored = permute_qk(torch.from_numpy(weight), n_head).numpy()
        if qtype in K_TYPES:
            data = raw_k_quant(*weight.shape, qtype, rng)
            exact = dequantize(data, qtype)  # random blocks: only exactness is checkable
            expected[hf_name] = (torch.from_numpy(exact.copy()), 0.0)
        else:
            data = stored if qtype == Q.F32 else quantize(stored, qtype)
            expected[hf_name] = (torch.from_numpy(weight), TOLERANCE[qtype])
        writer.add_tensor(name, data, raw_dtype=None if qtype == Q.F32 else qtype)

    add("token_embd.weight", "model.embed_tokens.weight", randn(rng, VOCAB, HIDDEN), Q.Q8_0)
    for i in range(LAYERS):
        for name, module, shape, *types in LAYER_TENSORS:
            n_head = {"attn_q": HEADS, "attn_k": KV_HEADS}.get(name, 0)
            hf = f"model.layers.{i}.{module}.weight"
            add(f"blk.{i}.{name}.weight", hf, randn(rng, *shape), types[i], n_head)
        for name, module in NORMS:
            hf = f"model.layers.{i}.{module}.weight"
            add(f"blk.{i}.{name}.weight", hf, randn(rng, HIDDEN), Q.F32)
        for name, module, rows in BIASES if arch == "qwen2" else ():
            hf = f"model.layers.{i}.self_attn.{module}.bias"
            add(f"blk.{i}.{name}.bias", hf, randn(rng, rows), Q.F32)
    add("output_norm.weight", "model.norm.weight", randn(rng, HIDDEN), Q.F32)
    add("output.weight", "lm_head.weight", randn(rng, VOCAB, HIDDEN), Q.F16)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def randn(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def stored(qtype: Q, n: int, k: int, seed: int = 0) -> tuple[StoredBlocks, torch.Tensor]:
    """Blocks of `qtype` and the float weight gguf-py dequantizes them to."""
    rng = np.random.default_rng(seed)
    if qtype in K_TYPES:  # gguf-py cannot quantize to K types: random codes and sub-scales
        raw = raw_k_quant(n, k, qtype, rng)
    else:
        raw = quantize(rng.standard_normal((n, k)).astype(np.float32) * 0.05, qtype)
    weight = torch.from_numpy(dequantize(raw, qtype).astype(np.float32).reshape(n, k))
    return StoredBlocks(int(qtype), raw, (n, k)), weight
