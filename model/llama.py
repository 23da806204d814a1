"""The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM2) over a flattened token batch.

Tokens of every sequence in a step are packed into one (T, hidden) tensor; only attention
needs to know where one sequence ends (see attention.py). Q/K/V and gate/up are fused into one
matmul each; `load_weights` maps Hugging Face parameter names onto the fused layout.

A `LlamaModel` is one shard (model/parallel.py): the layers of a pipeline stage, and within
them one tensor-parallel rank's heads, intermediate columns and vocabulary rows. QKV and
gate/up are column-parallel, O and down row-parallel with one all-reduce each; the embedding
and LM head are vocab-parallel. `load_weights` takes from each checkpoint tensor only the rows and
columns of this shard (read from the file alone when given `TensorRef`s), so no rank ever reads
or holds another rank's weights, and no stage another stage's layers. With one shard of
everything (the default) the collectives are no-ops and this is the plain model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.engine.config import ModelConfig, RopeScaling
from splitserve.model.attention import AttentionMetadata, PagedAttentionBackend
from splitserve.model.loader import Region, StoredBlocks, TensorRef, cut
from splitserve.model.parallel import ShardSpec


class Collectives(Protocol):
    """What a tensor-parallel shard needs from its group."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor: ...  # sum over ranks, in place

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor: ...  # concat on the last dim


class SingleRank:
    """The group of one: every collective is the identity."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        return x


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # One fused op instead of eight dispatches (a decode step makes 2 per layer); on
            # float32 it computes what the lines below do.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
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
    def __init__(
        self, cfg: ModelConfig, num_heads: int, num_kv_heads: int, comm: Collectives
    ) -> None:
        super().__init__()
        self.comm = comm
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
        return self.comm.all_reduce(self.o_proj(out.flatten(1)))


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, comm: Collectives) -> None:
        super().__init__()
        self.comm = comm
        self.intermediate = intermediate
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.comm.all_reduce(self.down_proj(F.silu(gate) * up))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: ShardSpec, comm: Collectives) -> None:
        super().__init__()
        heads = shard.heads(cfg)
        i0, i1 = shard.intermediate(cfg)
        self.self_attn = Attention(cfg, heads.num_q, heads.num_kv, comm)
        self.mlp = MLP(cfg.hidden_size, i1 - i0, comm)
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
    """One shard of the model (see the module docstring); the default shard is all of it."""

    def __init__(
        self,
        cfg: ModelConfig,
        max_positions: int | None = None,
        shard: ShardSpec | None = None,
        comm: Collectives | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.shard = shard = shard or ShardSpec()
        # id(parameter) -> {fused shard index or None: the file's blocks for it}, filled by
        # load_weights from GGUF files, read and emptied by prepare_linears
        self.stored_blocks: dict[int, dict[int | None, StoredBlocks]] = {}
        self.comm = comm or SingleRank()
        self.first_layer, self.last_layer = shard.layers(cfg)
        self.is_first, self.is_last = shard.is_first(cfg), shard.is_last(cfg)
        self.heads = shard.heads(cfg)
        self.vocab_range = shard.vocab(cfg)
        self.intermediate_range = shard.intermediate(cfg)
        local_vocab = self.vocab_range[1] - self.vocab_range[0]
        if self.is_first:
            self.embed_tokens = nn.Embedding(local_vocab, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, shard, self.comm) for _ in range(self.last_layer - self.first_layer)
        )
        if self.is_last:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.lm_head = nn.Linear(cfg.hidden_size, local_vocab, bias=False)
            if cfg.tie_word_embeddings and self.is_first:
                self.lm_head.weight = self.embed_tokens.weight
        self.rotary = Rotary(cfg, max_positions or cfg.max_position_embeddings)
        # model/fused_decode.py's flat loop for decode-sized steps, set up by the shard when
        # every linear multiplies in int8 blocks; None: the modules run every step
        self.fused = None

    @property
    def num_local_layers(self) -> int:
        return len(self.layers)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.shard.tp_size == 1:
            return self.embed_tokens(input_ids)
        v0, v1 = self.vocab_range
        mine = (input_ids >= v0) & (input_ids < v1)
        x = self.embed_tokens((input_ids - v0).clamp(0, v1 - v0 - 1))
        return self.comm.all_reduce(x * mine.unsqueeze(-1).to(x.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,  # (T,); ignored by a shard that is not first
        positions: torch.Tensor,  # (T,)
        kv_cache: torch.Tensor,  # (local_layers, 2, num_blocks, block_size, kv_heads, head_dim)
        meta: AttentionMetadata,
        backend: PagedAttentionBackend,
        hidden: torch.Tensor | None = None,  # (T, hidden) from the previous stage
    ) -> torch.Tensor:  # (T, hidden), before the final norm
        x = self.embed(input_ids) if hidden is None else hidden
        if self.fused is not None and x.shape[0] <= self.fused.MAX_TOKENS:
            return self.fused(x, positions, kv_cache, meta, backend, owned=hidden is None)
        cos_sin = self.rotary.cos_sin(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos_sin, kv_cache[i, 0], kv_cache[i, 1], meta, backend)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.comm.all_gather_last(self.lm_head(self.norm(hidden)))

    @torch.no_grad()
    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor | TensorRef]]) -> set[str]:
        """Copy Hugging Face-named tensors in, each cut down to this shard; returns the names of
        parameters filled. A `TensorRef` is read only for the rows and columns this shard keeps,
        and not at all when it belongs to another stage."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for hf_name, tensor in tensors:
            for name, shard, rows, cols in self._regions(hf_name):
                if name not in params:
                    continue
                if isinstance(tensor, TensorRef):
                    piece = tensor.read(rows, cols)
                    stored = tensor.read_blocks(rows, cols)
                    if stored is not None:  # for the block kernel; dropped once it has run
                        self.stored_blocks.setdefault(id(params[name]), {})[shard] = stored
                else:
                    piece = cut(tensor, rows, cols)
                dst = params[name]
                if shard is not None:
                    dst = self._shard_view(name, dst, shard)
                if dst.shape != piece.shape:
                    raise ValueError(
                        f"{hf_name}: shape {tuple(piece.shape)} on this shard, "
                        f"expected {tuple(dst.shape)}"
                    )
                dst.copy_(piece)
                loaded.add(f"{name}#{shard}" if shard is not None else name)
        return loaded

    def _regions(self, hf_name: str) -> list[tuple[str, int | None, Region, Region]]:
        """(our name, fused shard index, rows, columns) this shard takes of one HF tensor;
        none if the tensor belongs to another stage. None rows or columns mean all of them."""
        name = hf_name.removeprefix("model.")
        if name.startswith("layers."):
            _, idx, rest = name.split(".", 2)
            i = int(idx)
            if not self.first_layer <= i < self.last_layer:
                return []
            name = f"layers.{i - self.first_layer}.{rest}"
        if name == "embed_tokens.weight":
            rows = self._rows(self.vocab_range)
            out = [(name, None, rows, None)] if self.is_first else []
            if self.is_last and self.cfg.tie_word_embeddings and not self.is_first:
                out.append(("lm_head.weight", None, rows, None))
            return out
        if name == "lm_head.weight":
            return [(name, None, self._rows(self.vocab_range), None)]
        hd = self.cfg.head_dim
        q0, q1 = self.heads.q_heads
        k0, k1 = self.heads.kv_heads
        col_ranges = {
            "q_proj": (q0 * hd, q1 * hd),
            "k_proj": (k0 * hd, k1 * hd),
            "v_proj": (k0 * hd, k1 * hd),
            "gate_proj": self.intermediate_range,
            "up_proj": self.intermediate_range,
        }
        row_ranges = {"o_proj": (q0 * hd, q1 * hd), "down_proj": self.intermediate_range}
        for frag, rng in col_ranges.items():
            if f".{frag}." in name:
                fused, shard = _FUSED[frag]
                return [(name.replace(frag, fused), shard, self._rows(rng), None)]
        for frag, cols in row_ranges.items():
            if f".{frag}." in name and name.endswith(".weight"):
                return [(name, None, None, self._rows(cols))]
        return [(name, None, None, None)]

    def _rows(self, rng: tuple[int, int]) -> Region:
        return None if self.shard.tp_size == 1 else rng

    def _shard_view(self, name: str, param: torch.Tensor, shard: int) -> torch.Tensor:
        if "qkv_proj" in name:
            layer = self.layers[0].self_attn
            sizes = [layer.q_size, layer.kv_size, layer.kv_size]
        else:
            sizes = [self.layers[0].mlp.intermediate] * 2
        return param.split(sizes, dim=0)[shard]

    def expected_weights(self) -> set[str]:
        """What `load_weights` must have filled for the shard to be complete."""
        out: set[str] = set()
        for name, _ in self.named_parameters():
            if "qkv_proj.weight" in name or "qkv_proj.bias" in name:
                out |= {f"{name}#{i}" for i in range(3)}
            elif "gate_up_proj" in name:
                out |= {f"{name}#{i}" for i in range(2)}
            else:
                out.add(name)
        return out

    @torch.no_grad()
    def hf_tensors(self) -> Iterable[tuple[str, torch.Tensor]]:
        """This (full, unsharded) model's weights under Hugging Face names: what a checkpoint
        would hold. Random-weight shards load from it, so every layout has the same weights."""
        for name, param in self.named_parameters():
            base = f"model.{name}" if not name.startswith("lm_head") else name
            if "qkv_proj" in name:
                layer = self.layers[0].self_attn
                parts = param.split([layer.q_size, layer.kv_size, layer.kv_size], dim=0)
                for frag, part in zip(("q_proj", "k_proj", "v_proj"), parts, strict=True):
                    yield base.replace("qkv_proj", frag), part
            elif "gate_up_proj" in name:
                gate, up = param.split(self.layers[0].mlp.intermediate, dim=0)
                yield base.replace("gate_up_proj", "gate_proj"), gate
                yield base.replace("gate_up_proj", "up_proj"), up
            else:
                yield base, param
