"""Builds the model and the KV pool, and turns a scheduled batch into logits.

The KV pool is one preallocated tensor sized from a memory budget: after load it is the only
large allocation, and nothing grows per request.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from splitserve.engine.attention import AttentionMetadata, PagedAttentionBackend
from splitserve.engine.config import EngineConfig, ModelConfig, parse_dtype
from splitserve.engine.cpu_attention import select_backend
from splitserve.engine.model import LlamaModel
from splitserve.engine.outputs import KVExport
from splitserve.engine.sequence import Sequence


def kv_block_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return cfg.kv_bytes_per_token * block_size * dtype.itemsize


@dataclass
class StepInputs:
    """A step's flattened tensors, with decodes first; `sample_seqs` get a next token."""

    seqs: list[Sequence]
    input_ids: torch.Tensor  # (T,)
    positions: torch.Tensor  # (T,)
    meta: AttentionMetadata
    sample_index: torch.Tensor  # (S,) rows of the flat batch whose logits are sampled
    sample_seqs: list[Sequence]


class ModelRunner:
    def __init__(
        self,
        model_cfg: ModelConfig,
        engine_cfg: EngineConfig,
        tensors: Iterable[tuple[str, torch.Tensor]] | None,
        num_tensors: int = 0,
        backend: PagedAttentionBackend | None = None,
    ) -> None:
        self.cfg = model_cfg
        self.dtype = parse_dtype(engine_cfg.dtype)
        self.device = torch.device(engine_cfg.device)
        self.block_size = engine_cfg.block_size
        self.max_model_len = engine_cfg.max_model_len or model_cfg.max_position_embeddings
        self.backend = backend or select_backend(engine_cfg.attention_backend, self.device)
        torch.manual_seed(engine_cfg.seed)  # only matters for random-weight test models
        with torch.device(self.device):
            model = LlamaModel(model_cfg, max_positions=self.max_model_len)
        self.model = model.to(self.dtype).eval()
        self.model.rotary.float()  # cos/sin tables stay float32, like the reference
        if tensors is not None:
            self._load(tensors, num_tensors)
        self.num_blocks = engine_cfg.num_kv_blocks or max(
            1,
            engine_cfg.kv_cache_memory_bytes
            // kv_block_bytes(model_cfg, self.block_size, self.dtype),
        )
        self.kv_cache = torch.zeros(
            (
                model_cfg.num_layers,
                2,
                self.num_blocks,
                self.block_size,
                model_cfg.num_kv_heads,
                model_cfg.head_dim,
            ),
            dtype=self.dtype,
            device=self.device,
        )

    def _load(self, tensors: Iterable[tuple[str, torch.Tensor]], num_tensors: int) -> None:
        bar = tqdm(
            tensors,
            total=num_tensors or None,
            desc="loading weights",
            unit="tensor",
            leave=False,
            disable=None,
        )
        loaded = self.model.load_weights(bar)
        missing = self.model.expected_weights() - loaded
        if missing:
            raise ValueError(
                f"checkpoint is missing {len(missing)} tensors, e.g. {sorted(missing)[0]}"
            )

    @property
    def kv_cache_bytes(self) -> int:
        return self.kv_cache.numel() * self.kv_cache.element_size()

    def prepare(self, seqs: list[Sequence], num_new: list[int]) -> StepInputs:
        order = sorted(range(len(seqs)), key=lambda i: num_new[i] != 1)  # stable: decodes first
        seqs = [seqs[i] for i in order]
        num_new = [num_new[i] for i in order]
        ids: list[int] = []
        pos: list[int] = []
        sample_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        for seq, n in zip(seqs, num_new, strict=True):
            start = seq.num_computed_tokens
            ids += seq.all_token_ids[start : start + n]
            pos += range(start, start + n)
            if start + n == seq.num_tokens:
                sample_rows.append(len(ids) - 1)
                sample_seqs.append(seq)
        meta = AttentionMetadata.build(
            self.block_size,
            [s.block_table for s in seqs],
            [s.num_computed_tokens for s in seqs],
            num_new,
            self.device,
        )
        return StepInputs(
            seqs=seqs,
            input_ids=torch.tensor(ids, dtype=torch.long, device=self.device),
            positions=torch.tensor(pos, dtype=torch.long, device=self.device),
            meta=meta,
            sample_index=torch.tensor(sample_rows, dtype=torch.long, device=self.device),
            sample_seqs=sample_seqs,
        )

    @torch.inference_mode()
    def execute(self, inputs: StepInputs) -> torch.Tensor:
        """Run the step; returns float32 logits (S, vocab) for `inputs.sample_seqs`."""
        hidden = self.model(
            inputs.input_ids, inputs.positions, self.kv_cache, inputs.meta, self.backend
        )
        if not inputs.sample_seqs:
            return hidden.new_empty((0, self.cfg.vocab_size), dtype=torch.float32)
        return self.model.compute_logits(hidden[inputs.sample_index]).float()

    # ---- KV handoff ----------------------------------------------------------------------
    def read_blocks(self, block_table: list[int], num_tokens: int) -> KVExport:
        """Copy the blocks holding a request's first `num_tokens` tokens out of the pool."""
        ids = torch.tensor(
            block_table[: -(-num_tokens // self.block_size)], dtype=torch.long, device=self.device
        )
        return KVExport(self.kv_cache[:, :, ids].clone(), num_tokens)

    def write_blocks(self, block_table: list[int], data: torch.Tensor) -> None:
        expected = (*self.kv_cache.shape[:2], len(block_table), *self.kv_cache.shape[3:])
        if tuple(data.shape) != expected or data.dtype != self.dtype:
            raise ValueError(
                f"KV of shape {tuple(data.shape)} {data.dtype} does not fit {expected} {self.dtype}"
            )
        ids = torch.tensor(block_table, dtype=torch.long, device=self.device)
        self.kv_cache[:, :, ids] = data.to(self.device)
