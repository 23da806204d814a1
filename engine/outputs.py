"""What the engine hands back: per-step request deltas, exported KV, and engine statistics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from splitserve.engine.sequence import FinishReason

if TYPE_CHECKING:
    from splitserve.engine.block_manager import BlockManager
    from splitserve.engine.sampling_params import SamplingParams
    from splitserve.engine.sequence import Sequence
    from splitserve.engine.tokenizer import Tokenizer


@dataclass
class KVExport:
    """A request's prompt KV, as raw tensors: what prefill hands to decode."""

    data: torch.Tensor  # (num_layers, 2, num_blocks, block_size, kv_heads, head_dim)
    num_tokens: int

    @property
    def num_blocks(self) -> int:
        return self.data.shape[2]


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[float | None] = field(default_factory=list)
    new_top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)
    text: str = ""  # detokenized delta, stop strings cut out; "" when the engine has no tokenizer
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length", "abort"
    stop_reason: int | str | None = None  # the stop token id or string, when one matched
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    kv: KVExport | None = None
    # With the first token of a request that asked (SamplingParams.prompt_logprobs): entry p
    # is prompt token p + 1's (logprob, top-N); the first prompt token has none.
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None

    @classmethod
    def empty(cls, request_id: str) -> RequestOutput:
        return cls(request_id)

    @classmethod
    def delta(
        cls,
        seq: Sequence,
        token_id: int,
        logprob: float | None,
        top: list[tuple[int, float]] | None,
        text: str,
    ) -> RequestOutput:
        return cls(
            seq.request_id,
            [token_id],
            [logprob],
            [top],
            text,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            num_cached_tokens=seq.num_cached_prompt_tokens,
        )

    def finish(self, reason: FinishReason, stop_reason: int | str | None) -> None:
        self.finished = True
        self.finish_reason = reason.value
        self.stop_reason = stop_reason

    def merge(self, other: RequestOutput) -> None:
        """Accumulate a later delta into this one (for non-streaming callers)."""
        self.new_token_ids += other.new_token_ids
        self.new_logprobs += other.new_logprobs
        self.new_top_logprobs += other.new_top_logprobs
        self.text += other.text
        self.finished, self.finish_reason = other.finished, other.finish_reason
        self.stop_reason = other.stop_reason
        self.num_prompt_tokens = other.num_prompt_tokens
        self.num_output_tokens = other.num_output_tokens
        self.num_cached_tokens = other.num_cached_tokens
        self.kv = other.kv or self.kv
        self.prompt_logprobs = self.prompt_logprobs or other.prompt_logprobs


class StopChecker:
    """Decides when a request ends, and detokenizes with stop strings held back and cut."""

    def __init__(
        self,
        params: SamplingParams,
        eos_token_ids: tuple[int, ...],
        tokenizer: Tokenizer | None,
        prompt_token_ids: list[int],
    ) -> None:
        self.params = params
        self.eos = () if params.ignore_eos else eos_token_ids
        self.detok = None
        if tokenizer is not None:
            from splitserve.engine.tokenizer import IncrementalDetokenizer

            self.detok = IncrementalDetokenizer(tokenizer, prompt_token_ids)
        self.text = ""
        self.num_emitted = 0
        self.holdback = max((len(s) for s in params.stop), default=1) - 1

    def check(
        self, seq: Sequence, token_id: int, max_model_len: int
    ) -> tuple[str, FinishReason | None, int | str | None]:
        reason, stop_reason = self._token_stop(seq, token_id, max_model_len)
        if self.detok is None:
            return "", reason, stop_reason
        self.text += self.detok.add([token_id])
        if reason is not None:
            self.text += self.detok.flush()
        hit = self._find_stop_string()
        if hit is not None:
            self.text = self.text[: hit[0]]
            reason, stop_reason = FinishReason.STOP, hit[1]
        end = len(self.text) if reason is not None else len(self.text) - self.holdback
        delta = self.text[self.num_emitted : max(end, self.num_emitted)]
        self.num_emitted += len(delta)
        return delta, reason, stop_reason

    def _token_stop(
        self, seq: Sequence, token_id: int, max_model_len: int
    ) -> tuple[FinishReason | None, int | None]:
        p = self.params
        if seq.num_output_tokens >= p.min_tokens:
            if token_id in p.stop_token_ids:
                return FinishReason.STOP, token_id
            if token_id in self.eos:
                return FinishReason.STOP, None
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= max_model_len:
            return FinishReason.LENGTH, None
        return None, None

    def _find_stop_string(self) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        window = max(0, self.num_emitted - self.holdback)
        for s in self.params.stop:
            idx = self.text.find(s, window)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, s)
        return best


@dataclass
class EngineStats:
    num_blocks: int
    block_size: int
    num_steps: int = 0
    num_finished: int = 0
    num_preemptions: int = 0
    num_batched_tokens: int = 0
    peak_block_usage: float = 0.0
    peak_slot_usage: float = 0.0
    last_batch_size: int = 0
    prefix_queried_tokens: int = 0
    prefix_hit_tokens: int = 0
    block_usage: float = 0.0
    slot_usage: float = 0.0
    num_free_blocks: int = 0

    def observe_step(self, bm: BlockManager, batch_size: int, num_tokens: int) -> None:
        self.num_steps += 1
        self.num_batched_tokens += num_tokens
        self.last_batch_size = batch_size
        self.block_usage, self.slot_usage = bm.usage, bm.slot_usage
        self.peak_block_usage = max(self.peak_block_usage, bm.usage)
        self.peak_slot_usage = max(self.peak_slot_usage, bm.slot_usage)
        self.prefix_queried_tokens = bm.stats.queried_tokens
        self.prefix_hit_tokens = bm.stats.hit_tokens
        self.num_free_blocks = bm.num_free_blocks

    @property
    def prefix_hit_rate(self) -> float:
        q = self.prefix_queried_tokens
        return self.prefix_hit_tokens / q if q else 0.0
