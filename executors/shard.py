"""One process's part of the model with its part of the KV pool, run from a `StepWire`.

`ModelShard` is what every layout is made of: the whole model in one process (the default), one
tensor-parallel rank, one pipeline stage, or one rank of one stage. It knows nothing about
requests or scheduling: it takes a step's integers (and the previous stage's hidden states)
and returns hidden states, or float32 logits when it holds the LM head.
"""

from __future__ import annotations

import logging

import torch
from tqdm import tqdm

from splitserve.engine.config import EngineConfig, ModelConfig, parse_dtype
from splitserve.model.attention import PagedAttentionBackend
from splitserve.model.cpu_attention import select_backend
from splitserve.model.cpu_linear import linear_weight_bytes, prepare_linears
from splitserve.model.fused_decode import MAX_TOKENS, FusedDecoder
from splitserve.model.kv_quant import STORAGE_DTYPE, check_device, kv_quant
from splitserve.model.llama import Collectives, LlamaModel
from splitserve.model.loader import Weights
from splitserve.model.parallel import ShardSpec
from splitserve.services import heap
from splitserve.wire.step_wire import StepWire

log = logging.getLogger("splitserve")


def max_positions(model_cfg: ModelConfig, engine_cfg: EngineConfig) -> int:
    return engine_cfg.max_model_len or model_cfg.max_position_embeddings


class ModelShard:
    def __init__(
        self,
        model_cfg: ModelConfig,
        engine_cfg: EngineConfig,
        shard: ShardSpec,
        num_blocks: int,
        tensors: Weights | None,
        num_tensors: int = 0,
        comm: Collectives | None = None,
        backend: PagedAttentionBackend | None = None,
    ) -> None:
        self.cfg = model_cfg
        self.shard = shard
        self.dtype = parse_dtype(engine_cfg.dtype)
        self.device = torch.device(engine_cfg.device)
        self.block_size = engine_cfg.block_size
        # None: KV in the model dtype; else int8/fp8 rows with their scales (model/kv_quant.py)
        self.kv_quant = kv_quant(engine_cfg.kv_cache_dtype)
        if self.kv_quant is not None:
            check_device(self.kv_quant, model_cfg.head_dim, self.device)
        self.backend = backend or select_backend(
            engine_cfg.attention_backend, self.device, self.kv_quant
        )
        positions = max_positions(model_cfg, engine_cfg)
        if tensors is None:
            # Random weights (tests): drawn for the whole model from the seed, then cut, so
            # every layout of the same seed holds the same numbers.
            torch.manual_seed(engine_cfg.seed)
            full = LlamaModel(model_cfg, max_positions=8)
            tensors, num_tensors = list(full.hf_tensors()), 0
            del full
        with torch.device(self.device):
            model = LlamaModel(model_cfg, max_positions=positions, shard=shard, comm=comm)
        self.model = model.to(self.dtype).eval()
        self.model.rotary.float()  # cos/sin tables stay float32, like the reference
        self._load(tensors, num_tensors)
        self.linears = prepare_linears(
            self.model,
            engine_cfg.linear_backend,
            self.device,
            self.dtype,
            quantization=engine_cfg.quantization,
            group_size=engine_cfg.quantization_group_size,
        )
        if engine_cfg.linear_backend == "blocks-int8":
            self.model.fused = FusedDecoder.build(self.model)
            if self.model.fused is not None:
                self.linears += f"; steps of <= {MAX_TOKENS} tokens in one fused loop"
        log.info("linear layers: %s", self.linears)
        # Every process that loads a shard (engine, TP rank, stage): reading and repacking the
        # weights frees as much as it keeps, and glibc would keep those pages for the process's
        # whole life (~90 MiB of 610 for SmolLM2 Q4_1 with a 64 MiB pool, measured).
        heap.trim()
        heads = self.model.heads
        self.num_blocks = num_blocks
        quant = self.kv_quant
        self.kv_dtype = self.dtype if quant is None else STORAGE_DTYPE
        row = model_cfg.head_dim if quant is None else quant.row_width(model_cfg.head_dim)
        self.kv_cache = torch.zeros(
            (self.model.num_local_layers, 2, num_blocks, self.block_size, heads.num_kv, row),
            dtype=self.kv_dtype,
            device=self.device,
        )

    def _load(self, tensors: Weights, num_tensors: int) -> None:
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
    def weight_bytes(self) -> int:
        seen, total = set(), 0
        for p in self.model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
        return total + linear_weight_bytes(self.model)

    @property
    def kv_cache_bytes(self) -> int:
        return self.kv_cache.numel() * self.kv_cache.element_size()

    @torch.inference_mode()
    def forward(self, wire: StepWire, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (T, hidden) for the next stage, or float32 logits (S, vocab) of the
        sampled rows when this shard holds the LM head."""
        ids, pos, meta, sample_index = wire.tensors(self.block_size, self.device)
        if hidden is not None:
            hidden = hidden.to(self.device, self.dtype)
        out = self.model(ids, pos, self.kv_cache, meta, self.backend, hidden=hidden)
        if not self.model.is_last:
            return out
        if not wire.num_samples:
            return out.new_empty((0, self.cfg.vocab_size), dtype=torch.float32)
        return self.model.compute_logits(out[sample_index]).float()

    # ---- KV handoff: this shard's layers and heads only ---------------------------------
    def read_kv(self, block_ids: list[int]) -> torch.Tensor:
        """(local_layers, 2, n, block_size, local_kv_heads, head_dim), a copy."""
        ids = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        return self.kv_cache[:, :, ids]  # indexing with a tensor copies: no clone on top

    def write_kv(self, block_ids: list[int], data: torch.Tensor) -> None:
        expected = (*self.kv_cache.shape[:2], len(block_ids), *self.kv_cache.shape[3:])
        if tuple(data.shape) != expected or data.dtype != self.kv_dtype:
            raise ValueError(
                f"KV of shape {tuple(data.shape)} {data.dtype} does not fit {expected} "
                f"{self.kv_dtype}"
            )
        ids = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        self.kv_cache[:, :, ids] = data.to(self.device)
