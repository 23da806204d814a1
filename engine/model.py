"""The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM2) over a flattened token batch.

Tokens of every sequence in a step are packed into one (T, hidden) tensor; only attention
needs to know where one sequence ends (see attention.py). Q/K/V and gate/up are fused into one
matmul each; `load_weights` maps Hugging Face parameter names onto the fused layout.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.engine.attention import AttentionMetadata, PagedAttentionBackend
from splitserve.engine.config import ModelConfig, RopeScaling


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the model dtype, as the reference implementation does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    # Llama 3: keep high frequencies, divide low ones by `factor`, blend in between.
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, blended, scaled)


class Rotary(nn.Module):
    """Rotary embedding with cos/sin precomputed for every position (rotate-half layout)."""

    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # (max_positions, head_dim)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        """(T, 1, head_dim) tables for a step, looked up once and shared by every layer."""
        return self.cos[positions].to(dtype)[:, None, :], self.sin[positions].to(dtype)[:, None, :]


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]):
    cos, sin = cos_sin
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, num_heads: int, num_kv_heads: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, cfg.head_dim
        self.q_size = num_heads * cfg.head_dim
        self.kv_size = num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(
            cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias
        )
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.scale = cfg.head_dim**-0.5

    def forward(self, x, cos_sin, k_cache, v_cache, meta, backend):
        qkv = self.qkv_proj(x)  # (T, q_size + 2 * kv_size)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, k, cos_sin)
        out = backend(q, k, v, k_cache, v_cache, meta, self.scale)  # (T, H, hd)
        return self.o_proj(out.flatten(1))


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, cfg.num_heads, cfg.num_kv_heads)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos_sin, k_cache, v_cache, meta, backend):
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, k_cache, v_cache, meta, backend)
        return x + self.mlp(self.post_attention_layernorm(x))


# HF name fragment -> (our parameter, shard index within the fused tensor)
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class LlamaModel(nn.Module):
    """Layers `[first_layer, last_layer)`; a pipeline stage owns a slice, a full model all."""

    def __init__(self, cfg: ModelConfig, max_positions: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = Rotary(cfg, max_positions or cfg.max_position_embeddings)

    def forward(
        self,
        input_ids: torch.Tensor,  # (T,)
        positions: torch.Tensor,  # (T,)
        kv_cache: torch.Tensor,  # (num_layers, 2, num_blocks, block_size, kv_heads, head_dim)
        meta: AttentionMetadata,
        backend: PagedAttentionBackend,
    ) -> torch.Tensor:  # (T, hidden), before the final norm
        x = self.embed_tokens(input_ids)
        cos_sin = self.rotary.cos_sin(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos_sin, kv_cache[i, 0], kv_cache[i, 1], meta, backend)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))

    @torch.no_grad()
    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy Hugging Face-named tensors in; returns the names of parameters filled."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for hf_name, tensor in tensors:
            name, shard = self._map_name(hf_name)
            if name not in params:
                continue
            dst = params[name]
            if shard is not None:
                dst = self._shard_view(name, dst, shard)
            if dst.shape != tensor.shape:
                raise ValueError(
                    f"{hf_name}: shape {tuple(tensor.shape)}, expected {tuple(dst.shape)}"
                )
            dst.copy_(tensor)
            loaded.add(f"{name}#{shard}" if shard is not None else name)
        return loaded

    def _map_name(self, hf_name: str) -> tuple[str, int | None]:
        name = hf_name.removeprefix("model.")
        for frag, (fused, shard) in _FUSED.items():
            if f".{frag}." in name:
                return name.replace(frag, fused), shard
        return name, None

    def _shard_view(self, name: str, param: torch.Tensor, shard: int) -> torch.Tensor:
        if "qkv_proj" in name:
            layer = self.layers[0].self_attn
            sizes = [layer.q_size, layer.kv_size, layer.kv_size]
        else:
            sizes = [self.cfg.intermediate_size] * 2
        return param.split(sizes, dim=0)[shard]

    def expected_weights(self) -> set[str]:
        """What `load_weights` must have filled for the model to be complete."""
        out: set[str] = set()
        for name, _ in self.named_parameters():
            if "qkv_proj.weight" in name or "qkv_proj.bias" in name:
                out |= {f"{name}#{i}" for i in range(3)}
            elif "gate_up_proj" in name:
                out |= {f"{name}#{i}" for i in range(2)}
            else:
                out.add(name)
        if self.cfg.tie_word_embeddings:
            out.discard("lm_head.weight")
        return out
