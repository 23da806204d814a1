"""What the engine needs of whatever runs its model: the `Runner` interface.

The engine core schedules sequences and samples tokens; a runner turns a scheduled batch into
logits and keeps the KV pool. The core sees only this protocol and is handed an implementation
(`splitserve.executors.runner.ModelRunner`, built by `splitserve.executors.build`), so it
imports nothing that starts processes, opens sockets or loads weights.

A step's inputs are the runner's own business: the core passes them back unopened, reading only
`sample_seqs`, the sequences whose logits come back, in row order.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Protocol, TypeVar

import torch

from splitserve.engine.outputs import KVExport
from splitserve.engine.sequence import Sequence


class PreparedStep(Protocol):
    """A step as the runner prepared it; all the core reads of it."""

    @property
    def sample_seqs(self) -> Seq[Sequence]:
        """The sequences that get a next token: one logits row each, in this order."""
        ...

    @property
    def prompt_spans(self) -> Seq[tuple[Sequence, int, int, int]]:
        """Rows of prompt logits (prompt logprobs): (sequence, first position, first logits
        row, count). Empty in most steps; then the logits are the sample rows alone."""
        ...

    @property
    def sample_index(self) -> Seq[int]:
        """Each sample_seqs entry's logits row (used only when prompt_spans is not empty)."""
        ...


InputsT = TypeVar("InputsT", bound=PreparedStep)


class Runner(Protocol[InputsT]):
    """Runs steps and holds the KV pool. KV goes in and out in the full model's layout
    `kv_layout` = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)."""

    @property
    def num_blocks(self) -> int: ...

    @property
    def max_model_len(self) -> int:
        """The longest sequence the model takes (positions), before the pool's own limit."""
        ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def kv_layout(self) -> tuple[int, ...]: ...

    @property
    def kv_cache_bytes(self) -> int: ...

    @property
    def weight_bytes(self) -> int: ...

    @property
    def broken(self) -> str | None:
        """Why it can never run again (a lost rank or stage); None while it can."""
        ...

    @property
    def overlap_groups(self) -> int:
        """How many steps of disjoint sequence groups may be in flight at once (`submit` /
        `collect`); 0: one step at a time (`execute`)."""
        ...

    def prepare(self, seqs: list[Sequence], num_new: list[int]) -> InputsT:
        """The step that computes `num_new[i]` more tokens of `seqs[i]`."""
        ...

    def execute(self, inputs: InputsT) -> torch.Tensor:
        """Run the step; float32 logits (S, vocab) for `inputs.sample_seqs`."""
        ...

    def submit(self, inputs: InputsT) -> None:
        """Start the step and return before its logits exist (`overlap_groups` > 0 only)."""
        ...

    def collect(self) -> torch.Tensor:
        """The logits of the oldest submitted step, as `execute` returns them."""
        ...

    def read_blocks(self, block_table: list[int], num_tokens: int) -> KVExport:
        """Copy the blocks holding a request's first `num_tokens` tokens out of the pool."""
        ...

    def write_blocks(self, block_table: list[int], data: torch.Tensor) -> None:
        """Write `data` (layers, 2, len(block_table), ...) into those blocks."""
        ...

    def close(self) -> None:
        """Stop whatever the runner started (processes, connections); idempotent."""
        ...
