"""Builds the model and the KV pool, and turns a scheduled batch into logits.

The KV pool is preallocated and sized from a memory budget: after load it is the only large
allocation, and nothing grows per request. Where the model runs is an `Executor`: one
`ModelShard` in this process (the default), a tensor-parallel group
(executors/tensor_parallel.py) or a pipeline of stage processes (executors/pipeline/). The
runner only schedules onto it: it sends a `StepWire` and gets logits back, and it moves KV in
the full model's layout, whatever the shards hold.

`ModelRunner` is the engine core's `Runner` (splitserve.engine.runner); `build.py` hands one to
an `LLMEngine`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from splitserve.engine.config import EngineConfig, ModelConfig, parse_dtype
from splitserve.engine.outputs import KVExport
from splitserve.engine.sequence import Sequence
from splitserve.executors.shard import ModelShard, max_positions
from splitserve.model.attention import PagedAttentionBackend
from splitserve.model.kv_quant import STORAGE_DTYPE, kv_quant, kv_row_bytes
from splitserve.model.loader import Weights
from splitserve.model.parallel import ShardSpec, max_kv_block_elems, stage_layer_ranges
from splitserve.wire.step_wire import StepWire


def kv_block_bytes(
    cfg: ModelConfig, block_size: int, dtype: torch.dtype, kv_cache_dtype: str = "auto"
) -> int:
    """Bytes of one block of every layer, as the pool holds it (scales included)."""
    rows = cfg.kv_bytes_per_token // cfg.head_dim  # (K, V) x layers x kv heads
    return rows * block_size * kv_row_bytes(cfg.head_dim, dtype, kv_cache_dtype)


def plan_num_blocks(model_cfg: ModelConfig, engine_cfg: EngineConfig) -> int:
    """Blocks in the pool. The memory budget is per process: every shard gets the block count
    its largest sibling can afford, so all of them index the same blocks."""
    if engine_cfg.num_kv_blocks:
        return engine_cfg.num_kv_blocks
    ranges = stage_layer_ranges(model_cfg, engine_cfg.pipeline_stages, engine_cfg.pipeline_layers)
    elems = max_kv_block_elems(
        model_cfg, engine_cfg.block_size, engine_cfg.tensor_parallel_size, ranges
    )
    row = kv_row_bytes(model_cfg.head_dim, parse_dtype(engine_cfg.dtype), engine_cfg.kv_cache_dtype)
    return max(1, engine_cfg.kv_cache_memory_bytes // (elems // model_cfg.head_dim * row))


class Executor(Protocol):
    """Where the model runs. KV goes in and out in the full model's layout
    `(num_layers, 2, n, block_size, num_kv_heads, head_dim)`."""

    num_blocks: int
    weight_bytes: int  # in this process
    kv_cache_bytes: int  # in this process
    broken: str | None  # why it can never run again (a lost rank or stage); None while it can

    def execute(self, wire: StepWire) -> torch.Tensor: ...  # float32 (S, vocab)

    def read_kv(self, block_ids: list[int]) -> torch.Tensor: ...

    def write_kv(self, block_ids: list[int], data: torch.Tensor) -> None: ...

    def close(self) -> None: ...


class LocalExecutor:
    """The whole model in this process."""

    broken = None  # nothing here can be lost

    def __init__(self, shard: ModelShard) -> None:
        self.shard = shard
        self.num_blocks = shard.num_blocks

    @property
    def weight_bytes(self) -> int:
        return self.shard.weight_bytes

    @property
    def kv_cache_bytes(self) -> int:
        return self.shard.kv_cache_bytes

    def execute(self, wire: StepWire) -> torch.Tensor:
        return self.shard.forward(wire)

    def read_kv(self, block_ids: list[int]) -> torch.Tensor:
        return self.shard.read_kv(block_ids)

    def write_kv(self, block_ids: list[int], data: torch.Tensor) -> None:
        self.shard.write_kv(block_ids, data)

    def close(self) -> None:
        pass


def make_executor(
    model_cfg: ModelConfig,
    engine_cfg: EngineConfig,
    tensors: Weights | None,
    num_tensors: int,
    backend: PagedAttentionBackend | None,
) -> Executor:
    num_blocks = plan_num_blocks(model_cfg, engine_cfg)
    if engine_cfg.pipeline_stages > 1:
        from splitserve.executors.pipeline.executor import PipelineExecutor

        return PipelineExecutor(model_cfg, engine_cfg, num_blocks, tensors, num_tensors)
    if engine_cfg.tensor_parallel_size > 1:
        from splitserve.executors.tensor_parallel import TPExecutor

        return TPExecutor(
            model_cfg, engine_cfg, ShardSpec(), num_blocks, tensors, num_tensors, backend
        )
    shard = ModelShard(
        model_cfg, engine_cfg, ShardSpec(), num_blocks, tensors, num_tensors, backend=backend
    )
    return LocalExecutor(shard)


@dataclass
class StepInputs:
    """A step's sequences (decodes first) and their wire; `sample_seqs` get a next token.

    The logits come back in the wire's row order: a sequence's prompt-logprob rows
    (`prompt_spans`: sequence, first position, first row, count) then its sampled row;
    `sample_index` holds each sample_seqs entry's row."""

    seqs: list[Sequence]
    wire: StepWire
    sample_seqs: list[Sequence]
    prompt_spans: list[tuple[Sequence, int, int, int]] = field(default_factory=list)
    sample_index: list[int] = field(default_factory=list)


class ModelRunner:
    """The engine's `Runner`: steps as `StepInputs` over whichever `Executor` the config asks
    for, and the KV pool's handoff."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        engine_cfg: EngineConfig,
        tensors: Weights | None,
        num_tensors: int = 0,
        backend: PagedAttentionBackend | None = None,
    ) -> None:
        self.cfg = model_cfg
        self.dtype = parse_dtype(engine_cfg.dtype)
        self.kv_quant = kv_quant(engine_cfg.kv_cache_dtype)
        self.device = torch.device(engine_cfg.device)
        self.block_size = engine_cfg.block_size
        self.max_model_len = max_positions(model_cfg, engine_cfg)
        self.executor = make_executor(model_cfg, engine_cfg, tensors, num_tensors, backend)
        self.num_blocks = self.executor.num_blocks

    @property
    def kv_layout(self) -> tuple[int, ...]:
        """The pool's shape in the full model's layout, as KV is exported and imported."""
        c, q = self.cfg, self.kv_quant
        row = c.head_dim if q is None else q.row_width(c.head_dim)
        return (c.num_layers, 2, self.num_blocks, self.block_size, c.num_kv_heads, row)

    @property
    def kv_dtype(self) -> torch.dtype:
        """The pool's element dtype: the model's, or bytes for packed int8/fp8 rows."""
        return self.dtype if self.kv_quant is None else STORAGE_DTYPE

    @property
    def kv_format(self) -> str:
        """The KV's name on the wire (transfer headers, kvstore payloads): the model dtype's,
        or the packed format's ("kv_int8", "kv_fp8_e4m3")."""
        if self.kv_quant is None:
            return str(self.dtype).removeprefix("torch.")
        return self.kv_quant.wire_name

    @property
    def kv_cache_bytes(self) -> int:
        return self.executor.kv_cache_bytes

    @property
    def weight_bytes(self) -> int:
        return self.executor.weight_bytes

    @property
    def broken(self) -> str | None:
        return self.executor.broken

    def close(self) -> None:
        self.executor.close()

    def prepare(self, seqs: list[Sequence], num_new: list[int]) -> StepInputs:
        order = sorted(range(len(seqs)), key=lambda i: num_new[i] != 1)  # stable: decodes first
        seqs = [seqs[i] for i in order]
        num_new = [num_new[i] for i in order]
        wanted = [s.prompt_logit_positions(n) for s, n in zip(seqs, num_new, strict=True)]
        wire = StepWire.build(seqs, num_new, wanted if any(wanted) else ())
        inputs = StepInputs(seqs=seqs, wire=wire, sample_seqs=[])
        row = 0
        for s, n, positions in zip(seqs, num_new, wanted, strict=True):
            if positions:
                inputs.prompt_spans.append((s, positions.start, row, len(positions)))
                row += len(positions)
            if s.num_computed_tokens + n == s.num_tokens:
                inputs.sample_seqs.append(s)
                inputs.sample_index.append(row)
                row += 1
        return inputs

    def execute(self, inputs: StepInputs) -> torch.Tensor:
        """Run the step; returns float32 logits (S, vocab) for `inputs.sample_seqs`."""
        return self.executor.execute(inputs.wire)

    @property
    def overlap_groups(self) -> int:
        """How many steps of disjoint sequence groups may be in flight at once: the pipeline's
        micro-batch count under the `overlap` schedule, else 0 (one step at a time)."""
        return getattr(self.executor, "overlap_groups", 0)

    def submit(self, inputs: StepInputs) -> None:
        """Start a step and return before its logits exist (`overlap_groups` > 0 only)."""
        self.executor.submit(inputs.wire)

    def collect(self) -> torch.Tensor:
        """The logits of the oldest submitted step, as `execute` returns them."""
        return self.executor.collect()

    # ---- KV handoff ----------------------------------------------------------------------
    def read_blocks(self, block_table: list[int], num_tokens: int) -> KVExport:
        """Copy the blocks holding a request's first `num_tokens` tokens out of the pool."""
        return KVExport(
            self.executor.read_kv(block_table[: -(-num_tokens // self.block_size)]), num_tokens
        )

    def write_blocks(self, block_table: list[int], data: torch.Tensor) -> None:
        expected = (*self.kv_layout[:2], len(block_table), *self.kv_layout[3:])
        if tuple(data.shape) != expected or data.dtype != self.kv_dtype:
            raise ValueError(
                f"KV of shape {tuple(data.shape)} {data.dtype} does not fit {expected} "
                f"{self.kv_dtype} ({self.kv_format})"
            )
        self.executor.write_kv(block_table, data)
