"""Paged attention: K/V live in a block pool and are read through per-sequence block tables.

A step's tokens are flattened into one (T, ...) batch, decodes first (one token each), then
prefill chunks. The backend writes each token's K/V into its slot and attends:

- decodes together: gather each sequence's blocks into (D, L, kv_heads, head_dim) and run one
  masked SDPA over the batch;
- each prefill chunk on its own: causal over its fresh K/V when nothing is cached before it,
  else over the gathered prefix + chunk with a causal mask offset by the cached length.

`AttentionMetadata` is built once per step and shared by every layer. Another backend (CUDA,
Triton, a C++ CPU kernel) only has to implement `PagedAttentionBackend` over the same cache
layout: `(num_blocks, block_size, num_kv_heads, head_dim)` per layer for K and for V.

With a low-precision KV cache (`quant`, model/kv_quant.py) the pool's last axis is a packed row
(values, then a scale): K/V are quantized as they are written, and only the blocks a step
gathers are dequantized, never the pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from splitserve.model.kv_quant import KVQuant


@dataclass
class PrefillChunk:
    start: int  # offset of the chunk's first token in the flattened batch
    num_tokens: int
    num_cached: int  # tokens of this sequence already in the cache before the chunk
    block_table: torch.Tensor  # (num_blocks,) long
    mask: torch.Tensor | None = None  # (num_tokens, num_cached + num_tokens) bool, when cached


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (T,) long: where each token's K/V goes in the flat pool
    num_decodes: int = 0
    decode_block_tables: torch.Tensor | None = None  # (D, max_blocks) long
    decode_context_lens: torch.Tensor | None = None  # (D,) long, including the new token
    decode_mask: torch.Tensor | None = None  # (D, 1, 1, max_blocks * block_size) bool
    prefills: list[PrefillChunk] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        block_size: int,
        block_tables: list[list[int]],
        num_cached: list[int],
        num_new: list[int],
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Sequences must be ordered decodes (num_new == 1) first."""
        slots: list[int] = []
        for table, start, n in zip(block_tables, num_cached, num_new, strict=True):
            slots += [
                table[p // block_size] * block_size + p % block_size
                for p in range(start, start + n)
            ]
        meta = cls(slot_mapping=torch.tensor(slots, dtype=torch.long, device=device))
        num_decodes = 0
        while num_decodes < len(num_new) and num_new[num_decodes] == 1:
            num_decodes += 1
        if num_decodes:
            meta.num_decodes = num_decodes
            max_blocks = max(len(t) for t in block_tables[:num_decodes])
            padded = [t + [0] * (max_blocks - len(t)) for t in block_tables[:num_decodes]]
            meta.decode_block_tables = torch.tensor(padded, dtype=torch.long, device=device)
            lens = torch.tensor([c + 1 for c in num_cached[:num_decodes]], device=device)
            meta.decode_context_lens = lens
            positions = torch.arange(max_blocks * block_size, device=device)
            meta.decode_mask = (positions[None, :] < lens[:, None])[:, None, None, :]
        start = num_decodes
        for table, cached, n in zip(
            block_tables[num_decodes:],
            num_cached[num_decodes:],
            num_new[num_decodes:],
            strict=True,
        ):
            chunk = PrefillChunk(
                start, n, cached, torch.tensor(table, dtype=torch.long, device=device)
            )
            if cached:
                q_pos = torch.arange(cached, cached + n, device=device)
                k_pos = torch.arange(cached + n, device=device)
                chunk.mask = k_pos[None, :] <= q_pos[:, None]
            meta.prefills.append(chunk)
            start += n
        return meta


class PagedAttentionBackend(Protocol):
    def __call__(
        self,
        q: torch.Tensor,  # (T, num_heads, head_dim)
        k: torch.Tensor,  # (T, num_kv_heads, head_dim)
        v: torch.Tensor,
        k_cache: torch.Tensor,  # (num_blocks, block_size, num_kv_heads, head_dim)
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # (T, num_heads, head_dim)
        ...


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    quant: KVQuant | None = None,
) -> None:
    if quant is not None:
        k, v = quant.quantize(k), quant.quantize(v)  # (T, kv_heads, head_dim + 2) bytes
    kv_heads, row = k_cache.shape[-2:]
    k_cache.view(-1, kv_heads, row).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, kv_heads, row).index_copy_(0, slot_mapping, v)


def _gather(
    cache: torch.Tensor,
    block_table: torch.Tensor,
    quant: KVQuant | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    # (..., num_blocks) -> (..., num_blocks * block_size, kv_heads, head_dim); index_select
    # copies whole blocks and is several times faster than advanced indexing here.
    blocks = cache.index_select(0, block_table.flatten())
    blocks = blocks.view(*block_table.shape[:-1], -1, *cache.shape[-2:])
    return blocks if quant is None else quant.dequantize(blocks, dtype)


def torch_decode(
    q, k_cache, v_cache, meta: AttentionMetadata, scale: float, quant: KVQuant | None = None
) -> torch.Tensor:
    """Decodes by gathering blocks into a padded batch and one masked SDPA."""
    tables = meta.decode_block_tables
    keys = _gather(k_cache, tables, quant, q.dtype).transpose(1, 2)  # (D, kvh, L, hd)
    values = _gather(v_cache, tables, quant, q.dtype).transpose(1, 2)
    return F.scaled_dot_product_attention(
        q.unsqueeze(2),
        keys,
        values,
        attn_mask=meta.decode_mask,
        scale=scale,
        enable_gqa=q.shape[1] != keys.shape[1],
    ).squeeze(2)


def torch_paged_attention(
    q,
    k,
    v,
    k_cache,
    v_cache,
    meta: AttentionMetadata,
    scale: float,
    decode=torch_decode,
    quant: KVQuant | None = None,
):
    if quant is None:
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    else:
        k, v = quant.quantize(k), quant.quantize(v)  # packed rows, as the pool holds them
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.prefills:
            # Fresh chunks attend over the values any later reader of the pool gets, so a
            # prompt gives the same answer chunked or not, prefilled here or elsewhere.
            k, v = quant.dequantize(k, q.dtype), quant.dequantize(v, q.dtype)
    out = torch.empty_like(q)
    gqa = q.shape[1] != k.shape[1]
    d = meta.num_decodes
    if d:
        if quant is None:
            out[:d] = decode(q[:d], k_cache, v_cache, meta, scale)
        else:
            out[:d] = decode(q[:d], k_cache, v_cache, meta, scale, quant=quant)
    for chunk in meta.prefills:
        sl = slice(chunk.start, chunk.start + chunk.num_tokens)
        qc = q[sl].transpose(0, 1).unsqueeze(0)  # (1, H, n, hd)
        if chunk.num_cached == 0:
            kc, vc = k[sl].transpose(0, 1)[None], v[sl].transpose(0, 1)[None]
            o = F.scaled_dot_product_attention(
                qc, kc, vc, is_causal=True, scale=scale, enable_gqa=gqa
            )
        else:
            ctx = chunk.num_cached + chunk.num_tokens
            table = chunk.block_table
            kc = _gather(k_cache, table, quant, q.dtype)[:ctx].transpose(0, 1)[None]
            vc = _gather(v_cache, table, quant, q.dtype)[:ctx].transpose(0, 1)[None]
            o = F.scaled_dot_product_attention(
                qc, kc, vc, attn_mask=chunk.mask, scale=scale, enable_gqa=gqa
            )
        out[sl] = o[0].transpose(0, 1)
    return out
