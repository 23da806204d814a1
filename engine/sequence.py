"""A request's state inside the engine.

There are no prefill and decode phases: a sequence has `num_tokens` (prompt + output so far)
and `num_computed_tokens` whose KV is in the cache, and each step computes some of the gap.
Chunked prefill, prefix-cache hits, resumption after preemption and imported KV are all just
different ways of moving `num_computed_tokens`.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from splitserve.engine.hashing import BlockHash, block_hashes
from splitserve.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"


@dataclass
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    cache_salt: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    generator: torch.Generator | None = None
    # The grammar its output must match (engine/guided.py Guide), advanced by every output token.
    guide: Any = None

    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # the stop token id or string that ended it

    # KV state, owned by the block manager
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_registered_blocks: int = 0
    num_cached_prompt_tokens: int = 0  # prefix-cache hit on first admission
    num_preemptions: int = 0
    _hashes: list[BlockHash] = field(default_factory=list)
    # A step computing it was submitted and is not collected yet (the pipeline's overlap
    # schedule): it is neither scheduled nor preempted, and its blocks stay until it is back.
    in_flight: bool = False
    # Prompt logprobs (params.prompt_logprobs): entry p is token p + 1's (logprob, top-N),
    # from the logits at position p; handed out once, with the first output token.
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    prompt_logprobs_sent: bool = False

    # what the engine has already reported to the caller
    num_reported_tokens: int = 0
    first_token_time: float | None = None

    def __post_init__(self) -> None:
        self.all_token_ids: list[int] = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def needs_prompt_logits(self) -> bool:
        """Its prompt positions still need logits: a prefix-cache hit would skip them."""
        return (
            self.params.prompt_logprobs is not None
            and not self.prompt_logprobs_sent
            and len(self.prompt_logprobs) < self.num_prompt_tokens - 1
        )

    def prompt_logit_positions(self, num_new: int) -> range:
        """Positions among the next `num_new` whose logits give prompt logprobs not yet had."""
        if not self.needs_prompt_logits:
            return range(0)
        start = max(self.num_computed_tokens, len(self.prompt_logprobs))
        return range(start, min(self.num_computed_tokens + num_new, self.num_prompt_tokens - 1))

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def resume_from(self, output_token_ids: Iterable[int]) -> None:
        """Before it is scheduled: the request already produced these tokens elsewhere (a
        migrated request). They are output like any other, and get computed with the prompt."""
        if self.num_computed_tokens or self.output_token_ids:
            raise ValueError("only a sequence that has not started can be resumed")
        self.output_token_ids = list(output_token_ids)
        self.all_token_ids = [*self.prompt_token_ids, *self.output_token_ids]
        if self.guide is not None:
            self.guide.consume(self.output_token_ids)

    def append_token(self, token_id: int) -> None:
        if self.guide is not None:
            self.guide.accept(token_id)
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def block_hashes(self, block_size: int, namespace: bytes) -> list[BlockHash]:
        """Hashes of all full blocks so far, extended incrementally as tokens arrive."""
        start = len(self._hashes)
        if (start + 1) * block_size <= self.num_tokens:
            parent = self._hashes[-1] if self._hashes else None
            self._hashes += block_hashes(
                self.all_token_ids, block_size, namespace, self.cache_salt, start, parent
            )
        return self._hashes

    def reset_for_recompute(self) -> None:
        """After preemption: the KV is gone, the tokens are not."""
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_preemptions += 1
