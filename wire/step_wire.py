"""A step's batch as plain integers: what every shard needs to run it, and nothing else.

The scheduler's decisions (which tokens, at which positions, into which KV blocks, and which
rows get sampled) are flattened into one int64 tensor, so a tensor-parallel group can broadcast
it and a pipeline stage can receive it as raw bytes: no Python objects cross a process.

    wire = StepWire.build(seqs, num_new)          # on the scheduler's process
    flat = wire.to_tensor()                       # -> broadcast / bytes on a stream
    wire = StepWire.from_tensor(flat)             # on a peer
    ids, pos, meta, sample_index = wire.tensors(block_size, device)

Sequences are ordered decodes (one new token) first, as attention expects.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from splitserve.model.attention import AttentionMetadata

if TYPE_CHECKING:
    from splitserve.engine.sequence import Sequence

HEADER = 4  # num_seqs, num_tokens, num_samples, num_table_entries


@dataclass
class StepWire:
    input_ids: list[int]  # (T,) every new token of every sequence, flattened
    positions: list[int]  # (T,)
    num_cached: list[int]  # (B,) tokens already in the cache before this step
    num_new: list[int]  # (B,)
    block_tables: list[list[int]]  # (B, *) each sequence's blocks
    sample_rows: list[int]  # (S,) rows of the flat batch whose logits are wanted

    @classmethod
    def build(
        cls, seqs: Seq[Sequence], num_new: Seq[int], logit_positions: Seq[range] = ()
    ) -> StepWire:
        """`logit_positions[i]`: positions of seqs[i] among its new tokens whose logits are
        wanted too (prompt logprobs), before its sampled row; the rows stay in batch order."""
        ids: list[int] = []
        pos: list[int] = []
        rows: list[int] = []
        extra = list(logit_positions) or [range(0)] * len(seqs)
        for seq, n, wanted in zip(seqs, num_new, extra, strict=True):
            start = seq.num_computed_tokens
            rows += (len(ids) + p - start for p in wanted)
            ids += seq.all_token_ids[start : start + n]
            pos += range(start, start + n)
            if start + n == seq.num_tokens:
                rows.append(len(ids) - 1)
        return cls(
            ids,
            pos,
            [s.num_computed_tokens for s in seqs],
            list(num_new),
            [s.block_table for s in seqs],
            rows,
        )

    @property
    def num_seqs(self) -> int:
        return len(self.num_new)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_samples(self) -> int:
        return len(self.sample_rows)

    def to_tensor(self) -> torch.Tensor:
        tables = [b for t in self.block_tables for b in t]
        flat = [self.num_seqs, self.num_tokens, self.num_samples, len(tables)]
        flat += self.num_cached + self.num_new + [len(t) for t in self.block_tables] + tables
        flat += self.input_ids + self.positions + self.sample_rows
        return torch.tensor(flat, dtype=torch.int64)

    @classmethod
    def from_tensor(cls, flat: torch.Tensor) -> StepWire:
        values = flat.tolist()
        if len(values) < HEADER:
            raise ValueError("step wire is shorter than its header")
        b, t, s, n_tab = values[:HEADER]
        if min(b, t, s, n_tab) < 0 or len(values) != HEADER + 3 * b + n_tab + 2 * t + s:
            raise ValueError("step wire sizes do not add up")
        at = HEADER

        def take(n: int) -> list[int]:
            nonlocal at
            out = values[at : at + n]
            at += n
            return out

        num_cached, num_new, lens = take(b), take(b), take(b)
        table_flat = take(n_tab)
        if sum(lens) != n_tab or sum(num_new) != t:
            raise ValueError("step wire sizes do not add up")
        tables, off = [], 0
        for n in lens:
            tables.append(table_flat[off : off + n])
            off += n
        return cls(take(t), take(t), num_cached, num_new, tables, take(s))

    def check(self, block_size: int, num_blocks: int, max_positions: int) -> None:
        """ValueError unless this is a batch a shard can run: what a peer process receives is
        checked before any index into the KV pool or the rotary table is taken from it.

        Every sequence computes at least one token, into blocks of a pool of `num_blocks`, that
        its table has room for; positions are exactly the ones its cached and new tokens call
        for, below `max_positions`; sampled rows are rows of this batch."""
        if not self.num_new:
            raise ValueError("step wire holds no sequence")
        lists = (self.num_cached, self.block_tables)
        if any(len(x) != self.num_seqs for x in lists) or len(self.positions) != self.num_tokens:
            raise ValueError("step wire sizes do not add up")
        at = 0
        for cached, new, table in zip(
            self.num_cached, self.num_new, self.block_tables, strict=True
        ):
            if cached < 0 or new < 1 or cached + new > min(len(table) * block_size, max_positions):
                raise ValueError(
                    f"a sequence of {cached} cached + {new} new tokens does not fit its "
                    f"{len(table)} blocks of {block_size} (or {max_positions} positions)"
                )
            if table and not 0 <= min(table) <= max(table) < num_blocks:
                raise ValueError(f"block ids outside the pool of {num_blocks}")
            if self.positions[at : at + new] != list(range(cached, cached + new)):
                raise ValueError("step wire positions are not its sequences' next positions")
            at += new
        if at != self.num_tokens:
            raise ValueError("step wire sizes do not add up")
        if any(not 0 <= r < self.num_tokens for r in self.sample_rows):
            raise ValueError(f"sampled rows outside the batch of {self.num_tokens} tokens")

    def split(self, parts: int) -> list[StepWire]:
        """Cut into up to `parts` micro-batches of whole sequences, as even in tokens as
        sequence boundaries allow. Concatenating their sampled rows gives this wire's order."""
        parts = max(1, min(parts, self.num_seqs))
        if parts == 1:
            return [self]
        bounds = _cut_points(self.num_new, parts)
        out = []
        tok = 0
        for lo, hi in itertools.pairwise(bounds):
            n_tok = sum(self.num_new[lo:hi])
            rows = [r - tok for r in self.sample_rows if tok <= r < tok + n_tok]
            out.append(
                StepWire(
                    self.input_ids[tok : tok + n_tok],
                    self.positions[tok : tok + n_tok],
                    self.num_cached[lo:hi],
                    self.num_new[lo:hi],
                    self.block_tables[lo:hi],
                    rows,
                )
            )
            tok += n_tok
        return out

    def tensors(
        self, block_size: int, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """input_ids, positions, attention metadata and sample index on `device`."""
        meta = AttentionMetadata.build(
            block_size, self.block_tables, self.num_cached, self.num_new, device
        )
        return (
            torch.tensor(self.input_ids, dtype=torch.long, device=device),
            torch.tensor(self.positions, dtype=torch.long, device=device),
            meta,
            torch.tensor(self.sample_rows, dtype=torch.long, device=device),
        )


def _cut_points(num_new: list[int], parts: int) -> list[int]:
    """Sequence indices `[0, c1, ..., len]` splitting `num_new` into `parts` non-empty runs of
    roughly equal token counts."""
    total = sum(num_new)
    bounds, acc, s = [0], 0, 1
    for i, n in enumerate(num_new):
        acc += n
        seqs_left = len(num_new) - (i + 1)
        cuts_left = parts - s
        if cuts_left == 0:
            break
        if acc >= total * s / parts or seqs_left == cuts_left:
            bounds.append(i + 1)
            s += 1
    bounds.append(len(num_new))
    return bounds
