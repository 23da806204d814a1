"""Who holds what under tensor and pipeline parallelism: pure arithmetic, no processes.

A *shard* is one process's part of the model: the layers `[first_layer, last_layer)` of one
pipeline stage, and within them tensor-parallel rank `tp_rank` of `tp_size`.

Tensor parallelism splits attention by KV-head groups (a query head always lives with the KV
head it reads) and the MLP by intermediate columns:

- `kv_heads >= tp_size`: KV heads are cut into `tp_size` contiguous, nearly equal runs, and each
  rank takes the query heads of its run. Runs may be uneven (SmolLM2-135M: 3 KV heads on 2
  ranks -> 2 + 1), which costs balance, not correctness: row-parallel outputs are summed.
- `kv_heads < tp_size`: each KV head is replicated on `tp_size // kv_heads` ranks, which split
  its query heads between them (needs both counts to divide evenly).

The vocabulary (embedding rows and LM-head rows) and the MLP's intermediate size are cut into
contiguous nearly equal ranges.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from splitserve.engine.config import ModelConfig


class ParallelConfigError(ValueError):
    """A TP/PP layout that cannot be built for this model (one line, shown to users)."""


def even_ranges(total: int, parts: int) -> list[tuple[int, int]]:
    """`[0, total)` cut into `parts` contiguous ranges whose sizes differ by at most one."""
    base, extra = divmod(total, parts)
    out, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        out.append((start, end))
        start = end
    return out


@dataclass(frozen=True)
class HeadSplit:
    q_heads: tuple[int, int]  # [start, end) of the model's query heads on this rank
    kv_heads: tuple[int, int]  # [start, end) of its KV heads (replicated ones included)

    @property
    def num_q(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def num_kv(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]


def head_split(cfg: ModelConfig, tp_size: int, tp_rank: int) -> HeadSplit:
    check_tp(cfg, tp_size)
    group = cfg.num_heads // cfg.num_kv_heads
    if cfg.num_kv_heads >= tp_size:
        k0, k1 = even_ranges(cfg.num_kv_heads, tp_size)[tp_rank]
        return HeadSplit((k0 * group, k1 * group), (k0, k1))
    replicas = tp_size // cfg.num_kv_heads
    per_rank = cfg.num_heads // tp_size
    kv = tp_rank // replicas
    return HeadSplit((tp_rank * per_rank, (tp_rank + 1) * per_rank), (kv, kv + 1))


def check_tp(cfg: ModelConfig, tp_size: int) -> None:
    if tp_size < 1:
        raise ParallelConfigError("--tensor-parallel-size must be at least 1")
    if cfg.num_heads % cfg.num_kv_heads:
        raise ParallelConfigError(
            f"{cfg.num_heads} attention heads do not group evenly over {cfg.num_kv_heads} KV heads"
        )
    if cfg.num_kv_heads < tp_size and (tp_size % cfg.num_kv_heads or cfg.num_heads % tp_size):
        raise ParallelConfigError(
            f"tensor parallel size {tp_size} does not fit {cfg.num_heads} heads / "
            f"{cfg.num_kv_heads} KV heads: with fewer KV heads than ranks both counts must divide"
        )
    if tp_size > cfg.intermediate_size or tp_size > cfg.vocab_size:
        raise ParallelConfigError(f"tensor parallel size {tp_size} is larger than the model")


def layer_param_count(cfg: ModelConfig) -> int:
    h, hd = cfg.hidden_size, cfg.head_dim
    attn = h * (cfg.num_heads + 2 * cfg.num_kv_heads) * hd + cfg.num_heads * hd * h
    return attn + 3 * h * cfg.intermediate_size + 2 * h


def stage_layer_ranges(
    cfg: ModelConfig, stages: int, explicit: list[int] | None = None
) -> list[tuple[int, int]]:
    """Layer ranges of `stages` pipeline stages.

    `explicit` gives each stage's layer count. Otherwise stages are balanced by parameter
    count: the embedding counts toward the first stage and the LM head toward the last (a
    tied head too: the last stage holds its own copy), so the end stages take fewer layers
    when those are large.
    """
    n = cfg.num_layers
    if stages < 1:
        raise ParallelConfigError("--pipeline-stages must be at least 1")
    if stages > n:
        raise ParallelConfigError(f"{stages} pipeline stages for a model of {n} layers")
    if explicit is not None:
        if len(explicit) != stages or any(c < 1 for c in explicit) or sum(explicit) != n:
            raise ParallelConfigError(
                f"--pipeline-layers must give {stages} positive counts summing to {n}; "
                f"got {explicit}"
            )
        counts = explicit
    else:
        counts = _balanced_counts(cfg, stages)
    out, start = [], 0
    for c in counts:
        out.append((start, start + c))
        start += c
    return out


def _balanced_counts(cfg: ModelConfig, stages: int) -> list[int]:
    per_layer = layer_param_count(cfg)
    embed = cfg.vocab_size * cfg.hidden_size
    head = embed  # a tied head is still a copy of the embedding on the last stage
    total = embed + cfg.num_layers * per_layer + head
    # Cut s falls after the layer whose running parameter count is nearest s/stages of the
    # total, leaving at least one layer to every stage on each side.
    cuts, prev = [], 0
    for s in range(1, stages):
        target = total * s / stages
        best = min(
            range(prev + 1, cfg.num_layers - (stages - s) + 1),
            key=lambda i: abs(embed + i * per_layer - target),
        )
        cuts.append(best)
        prev = best
    bounds = [0, *cuts, cfg.num_layers]
    return [b - a for a, b in itertools.pairwise(bounds)]


@dataclass(frozen=True)
class ShardSpec:
    """One process's part of the model."""

    tp_rank: int = 0
    tp_size: int = 1
    first_layer: int = 0
    last_layer: int | None = None  # exclusive; None = through the last layer

    def layers(self, cfg: ModelConfig) -> tuple[int, int]:
        end = cfg.num_layers if self.last_layer is None else self.last_layer
        if not 0 <= self.first_layer < end <= cfg.num_layers:
            raise ParallelConfigError(
                f"layer range [{self.first_layer}, {end}) is not inside {cfg.num_layers} layers"
            )
        return self.first_layer, end

    def is_first(self, cfg: ModelConfig) -> bool:
        return self.layers(cfg)[0] == 0

    def is_last(self, cfg: ModelConfig) -> bool:
        return self.layers(cfg)[1] == cfg.num_layers

    def heads(self, cfg: ModelConfig) -> HeadSplit:
        return head_split(cfg, self.tp_size, self.tp_rank)

    def intermediate(self, cfg: ModelConfig) -> tuple[int, int]:
        return even_ranges(cfg.intermediate_size, self.tp_size)[self.tp_rank]

    def vocab(self, cfg: ModelConfig) -> tuple[int, int]:
        return even_ranges(cfg.vocab_size, self.tp_size)[self.tp_rank]

    def kv_block_elems(self, cfg: ModelConfig, block_size: int) -> int:
        """K and V elements one block holds on this shard."""
        a, b = self.layers(cfg)
        return 2 * (b - a) * self.heads(cfg).num_kv * cfg.head_dim * block_size


def max_kv_block_elems(
    cfg: ModelConfig, block_size: int, tp_size: int, layer_ranges: list[tuple[int, int]]
) -> int:
    """The largest per-process block among all shards: every shard sizes its pool from it, so
    all of them get the same block count from the same memory budget."""
    return max(
        ShardSpec(r, tp_size, a, b).kv_block_elems(cfg, block_size)
        for r in range(tp_size)
        for a, b in layer_ranges
    )
