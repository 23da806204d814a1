"""LLMEngine: add requests, step, stream outputs, abort; export and import a request's KV.

This is the whole runtime in one process, and the API the prefill and decode services call:

    engine = create_engine(EngineConfig())  # splitserve.executors.build: loads, picks a runner
    engine.add_request("r1", prompt_token_ids, SamplingParams(max_tokens=32, temperature=0))
    while engine.has_unfinished_requests():
        for out in engine.step():
            ...  # out.new_token_ids, out.text, out.finished

Every path that ends a request (finish, stop, abort, error) returns its KV blocks.

The engine is handed its `Runner` (engine/runner.py) and never builds one, and how its steps
overlap on the runner is a `StepSchedule` (engine/step_schedule.py) picked once from it: `step`
is the same code for one step at a time and for the pipeline's groups in flight.
"""

from __future__ import annotations

import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from splitserve.engine.block_manager import BlockManager
from splitserve.engine.config import EngineConfig, ModelConfig, kv_cache_key
from splitserve.engine.guided import GrammarCompiler, Guide
from splitserve.engine.hashing import BlockHash, block_hashes, kv_namespace
from splitserve.engine.outputs import (
    EngineStats,
    KVExport,
    RequestOutput,
    StopChecker,
)
from splitserve.engine.runner import PreparedStep, Runner
from splitserve.engine.sampler import Sampler, SamplingRow, make_generator, prompt_logprobs
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import ScheduledBatch, Scheduler
from splitserve.engine.sequence import FinishReason, Sequence, SequenceStatus
from splitserve.engine.step_schedule import step_schedule

if TYPE_CHECKING:
    from splitserve.engine.tokenizer import Tokenizer


class RequestError(ValueError):
    """The request can't be served as given (empty, too long, duplicate id, ...)."""


class CapacityError(RequestError):
    """The request is valid but the KV pool can't take it now (maps to RESOURCE_EXHAUSTED)."""


@dataclass
class _Request:
    seq: Sequence
    stop: StopChecker
    export_kv: bool = False


@dataclass
class _BlockHolder:
    """Owns blocks for a moment without being a request (see cache_prefix_blocks)."""

    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_registered_blocks: int = 0


@dataclass
class LLMEngine:
    config: EngineConfig
    model_config: ModelConfig
    runner: Runner[Any]
    tokenizer: Tokenizer | None = None
    model_id: str = "model"
    _requests: dict[str, _Request] = field(default_factory=dict)
    # Requests holding blocks for KV that is still in flight (reserve_prefilled).
    _reserved: dict[str, _Request] = field(default_factory=dict)

    def __post_init__(self) -> None:
        cfg = self.config
        self.block_size = cfg.block_size
        # One sequence must always fit the pool, or preempting it could never help.
        self.max_model_len = min(self.runner.max_model_len, self.runner.num_blocks * cfg.block_size)
        self.block_manager = BlockManager(
            self.runner.num_blocks, cfg.block_size, cfg.enable_prefix_caching
        )
        self.namespace = kv_namespace(
            self.model_id,
            kv_cache_key(cfg.dtype, cfg.kv_cache_dtype, cfg.weights_key),
            cfg.block_size,
        )
        self.scheduler = Scheduler(
            self.block_manager,
            cfg.max_num_seqs,
            cfg.max_num_batched_tokens,
            self.namespace,
            on_preempt=self._count_preemption,
        )
        self.schedule = step_schedule(self.runner, self.scheduler)
        eos = self.tokenizer.eos_token_ids if self.tokenizer else self.model_config.eos_token_ids
        self.eos_token_ids = tuple(eos)
        self.sampler = Sampler(cfg.seed, self.eos_token_ids)
        self._grammars: GrammarCompiler | None = None
        self.stats = EngineStats(num_blocks=self.runner.num_blocks, block_size=cfg.block_size)

    def reschedule(self) -> None:
        """Pick the step schedule again from the runner, after its overlap changed (the
        pipeline bench sets micro-batches and schedule between runs). Only with no step in
        flight."""
        if self.schedule.num_in_flight:
            raise RuntimeError("reschedule with steps in flight")
        self.schedule = step_schedule(self.runner, self.scheduler)

    def close(self) -> None:
        """Stop the processes the runner started (TP ranks, pipeline stages); idempotent."""
        self.runner.close()

    # ---- requests ------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Seq[int],
        params: SamplingParams,
        cache_salt: str | None = None,
        export_kv: bool = False,
        resume_token_ids: Seq[int] = (),
    ) -> None:
        """Queue a request. `export_kv`: attach the prompt's KV to the final output.

        `resume_token_ids`: output the request already produced elsewhere (a migrated
        request). They are computed with the prompt and count as output in every respect
        (max_tokens, min_tokens, penalties, the seed's position); only new tokens are reported.
        """
        seq = self._new_sequence(request_id, prompt_token_ids, params, cache_salt)
        if resume_token_ids:
            self.check_resume(prompt_token_ids, params, resume_token_ids)
            seq.resume_from(resume_token_ids)
        self._requests[request_id] = _Request(seq, self._stop_checker(seq, params), export_kv)
        self.scheduler.add(seq)

    def add_prefilled_request(
        self,
        request_id: str,
        prompt_token_ids: Seq[int],
        first_token_id: int,
        params: SamplingParams,
        kv: KVExport,
        cache_salt: str | None = None,
    ) -> RequestOutput:
        """Adopt a request whose prompt KV was computed elsewhere and decode from there.

        CapacityError if the pool can't hold the prompt now (the caller retries elsewhere or
        later). Returns the first token's output. Services that transfer the KV after
        reserving call `reserve_prefilled` and `complete_prefilled` themselves.
        """
        self.reserve_prefilled(request_id, prompt_token_ids, params, cache_salt)
        return self.complete_prefilled(request_id, kv, first_token_id)

    def abort_request(self, request_id: str) -> bool:
        request = self._requests.pop(request_id, None)
        if request is None:
            return False
        seq = request.seq
        seq.finish_reason = FinishReason.ABORT
        # With a step in flight, the stages may still be writing its KV: its blocks go when
        # that step is back (`_release_aborted`).
        if not seq.in_flight:
            self.scheduler.finish(seq)
        return True

    def has_unfinished_requests(self) -> bool:
        """Requests to serve, or steps in flight still to collect."""
        return bool(self._requests or self.schedule.num_in_flight)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._requests)

    # ---- disaggregation: blocks first, KV later -------------------------------------------
    def reserve_prefilled(
        self,
        request_id: str,
        prompt_token_ids: Seq[int],
        params: SamplingParams,
        cache_salt: str | None = None,
    ) -> int:
        """Take the blocks a remotely prefilled prompt needs *before* its KV is transferred.

        Returns the number of blocks reserved. CapacityError if the pool can't hold the prompt
        now, so a transfer never starts for KV that has nowhere to go. The reservation ends in
        exactly one of `complete_prefilled` or `cancel_reserved`.
        """
        seq = self._new_sequence(request_id, prompt_token_ids, params, cache_salt)
        request = _Request(seq, self._stop_checker(seq, params))
        if not self.block_manager.allocate_slots(seq, seq.num_prompt_tokens):
            raise CapacityError("not enough free KV blocks to adopt this request now")
        self._reserved[request_id] = request
        return len(seq.block_table)

    def complete_prefilled(
        self, request_id: str, kv: KVExport, first_token_id: int
    ) -> RequestOutput:
        """Write the transferred KV into the reserved blocks and start decoding.

        Returns the first token's output (which may already be final). On any error the
        reservation is released and the error re-raised.
        """
        request = self._reserved.pop(request_id, None)
        if request is None:
            raise RequestError(f"request id {request_id!r} has no reservation")
        seq = request.seq
        try:
            if kv.num_tokens != seq.num_prompt_tokens:
                raise RequestError(
                    f"KV covers {kv.num_tokens} tokens, prompt has {seq.num_prompt_tokens}"
                )
            if not 0 <= first_token_id < self.model_config.vocab_size:
                raise RequestError(f"first token id {first_token_id} is outside the vocabulary")
            self.runner.write_blocks(seq.block_table, kv.data)
        except Exception:
            self.block_manager.free(seq)
            raise
        seq.num_computed_tokens = kv.num_tokens
        self.block_manager.register_full_blocks(
            seq, seq.block_hashes(self.block_size, self.namespace)
        )
        # No draw to skip for a seeded request: the sampler seeds each output position on its
        # own, so the next token (position 1) draws what it would have in one engine.
        self._requests[request_id] = request
        seq.status = SequenceStatus.RUNNING
        self.scheduler.running.append(seq)
        seq.first_token_time = time.monotonic()
        return self._append_token(request, first_token_id)

    def cancel_reserved(self, request_id: str) -> bool:
        request = self._reserved.pop(request_id, None)
        if request is None:
            return False
        self.block_manager.free(request.seq)
        return True

    @property
    def num_reserved_requests(self) -> int:
        return len(self._reserved)

    # ---- prefix blocks from outside (the kvstore) ----------------------------------------
    def prompt_block_hashes(
        self, prompt_token_ids: Seq[int], cache_salt: str | None
    ) -> list[BlockHash]:
        """The hash chain of the prompt's full blocks, in this engine's namespace."""
        return block_hashes(prompt_token_ids, self.block_size, self.namespace, cache_salt)

    def num_cached_prefix_blocks(self, hashes: Seq[BlockHash]) -> int:
        """How many leading blocks of `hashes` are in the local prefix cache (no stats)."""
        return len(self.block_manager.cached_prefix_blocks(hashes))

    def cache_prefix_blocks(self, hashes: Seq[BlockHash], data: torch.Tensor) -> int:
        """Adopt KV fetched from elsewhere as cached, unowned blocks so add_request hits them.

        `hashes` is the chain from block 0; `data` (layers, 2, n, block_size, kv_heads,
        head_dim) holds its last n blocks, and the blocks before them must be cached here
        already (otherwise the new ones could never be reached). Returns the number of blocks
        adopted: 0 when caching is off, the chain is broken or the pool has no room.
        """
        n = data.shape[2]
        start = len(hashes) - n
        bm = self.block_manager
        if not self.config.enable_prefix_caching or n <= 0 or start < 0:
            return 0
        held = bm.cached_prefix_blocks(hashes[:start])
        if len(held) < start:
            return 0
        # A placeholder owner pins the cached prefix (so allocating can't evict it) and takes
        # the new blocks; freeing it leaves them all cached with ref 0, most recent last.
        holder = _BlockHolder()
        if not bm.allocate_slots(holder, n * self.block_size, held):
            return 0
        try:
            self.runner.write_blocks(holder.block_table[start:], data)
            holder.num_computed_tokens = len(hashes) * self.block_size
            bm.register_full_blocks(holder, hashes)
        finally:
            bm.free(holder)
        return n

    # ---- the step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run and sample one step; the outputs of the sequences it sampled.

        Under the pipeline's overlap schedule a step is one group's, with the other groups'
        steps still in flight (engine/step_schedule.py). If running fails, the steps in flight
        are lost: their sequences stay where they were, to be recomputed or aborted, and the
        aborted ones go now.
        """
        try:
            ran = self.schedule.next()
        except BaseException:
            for batch in self.schedule.drop():
                self._release_aborted(batch)
            raise
        if ran is None:
            return []
        outputs = self._finish_step(ran.batch, ran.inputs, ran.logits)
        self._release_aborted(ran.batch)
        return outputs

    def _count_preemption(self, seq: Sequence) -> None:
        self.stats.num_preemptions += 1

    def _release_aborted(self, batch: ScheduledBatch) -> None:
        """Free the blocks of the batch's sequences aborted while its step was in flight."""
        for seq in batch.seqs:
            if seq.finish_reason is FinishReason.ABORT:
                self.scheduler.finish(seq)

    def _finish_step(
        self, batch: ScheduledBatch, inputs: PreparedStep, logits: torch.Tensor
    ) -> list[RequestOutput]:
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            seq.num_computed_tokens += n
            hashes = seq.block_hashes(self.block_size, self.namespace)
            self.block_manager.register_full_blocks(seq, hashes)
        self.stats.observe_step(self.block_manager, len(batch.seqs), batch.num_batched_tokens)
        if inputs.prompt_spans:
            self._collect_prompt_logprobs(logits, inputs.prompt_spans)
            logits = logits[list(inputs.sample_index)]
        if not inputs.sample_seqs:
            return []
        rows = [
            SamplingRow(s.params, s.generator, s.prompt_token_ids, s.output_token_ids, s.guide)
            for s in inputs.sample_seqs
        ]
        sampled = self.sampler(logits, rows)
        outputs = []
        now = time.monotonic()
        for i, seq in enumerate(inputs.sample_seqs):
            if seq.finish_reason is FinishReason.ABORT:  # while its step was in flight
                continue
            request = self._requests[seq.request_id]
            if seq.first_token_time is None:
                seq.first_token_time = now
            out = self._append_token(
                request, sampled.token_ids[i], sampled.logprobs[i], sampled.top_logprobs[i]
            )
            outputs.append(out)
        return outputs

    def _collect_prompt_logprobs(
        self, logits: torch.Tensor, spans: Seq[tuple[Sequence, int, int, int]]
    ) -> None:
        for seq, first, row, count in spans:
            if seq.finish_reason is FinishReason.ABORT or len(seq.prompt_logprobs) != first:
                continue
            k = seq.params.prompt_logprobs or 0
            next_ids = seq.prompt_token_ids[first + 1 : first + 1 + count]
            seq.prompt_logprobs += prompt_logprobs(logits[row : row + count], next_ids, k)

    def _append_token(
        self,
        request: _Request,
        token_id: int,
        logprob: float | None = None,
        top: list[tuple[int, float]] | None = None,
    ) -> RequestOutput:
        seq = request.seq
        seq.append_token(token_id)
        text, reason, stop_reason = request.stop.check(seq, token_id, self.max_model_len)
        out = RequestOutput.delta(seq, token_id, logprob, top, text)
        if seq.params.prompt_logprobs is not None and not seq.prompt_logprobs_sent:
            seq.prompt_logprobs_sent = True
            if len(seq.prompt_logprobs) == seq.num_prompt_tokens - 1:  # computed here
                out.prompt_logprobs = seq.prompt_logprobs
        if reason is not None:
            seq.finish_reason, seq.stop_reason = reason, stop_reason
            out.finish(reason, stop_reason)
            if request.export_kv:
                out.kv = self.runner.read_blocks(seq.block_table, seq.num_prompt_tokens)
            self.scheduler.finish(seq)
            del self._requests[seq.request_id]
            self.stats.num_finished += 1
        return out

    # ---- conveniences --------------------------------------------------------------------
    def generate(
        self,
        prompts: Seq[Seq[int]],
        params: SamplingParams | Seq[SamplingParams],
    ) -> list[RequestOutput]:
        """Run prompts to completion; returns one accumulated output per prompt, in order."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        ids = [f"gen-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, plist, strict=True):
            self.add_request(rid, prompt, p)
        results = {rid: RequestOutput.empty(rid) for rid in ids}
        while self.has_unfinished_requests():
            for out in self.step():
                results[out.request_id].merge(out)
        return [results[rid] for rid in ids]

    # ---- internals -----------------------------------------------------------------------
    def _new_sequence(
        self, request_id: str, prompt: Seq[int], params: SamplingParams, cache_salt: str | None
    ) -> Sequence:
        if request_id in self._requests or request_id in self._reserved:
            raise RequestError(f"request id {request_id!r} is already running")
        self.check_request(prompt, params)
        return Sequence(
            request_id,
            list(prompt),
            params,
            cache_salt,
            generator=make_generator(params.seed),
            guide=self._guide(params),
        )

    def grammar_compiler(self) -> GrammarCompiler:
        """Structured outputs' compiler for this engine's tokenizer (made on first use)."""
        if self.tokenizer is None:
            raise RequestError("structured outputs need a tokenizer; this model has none")
        if self._grammars is None:
            self._grammars = GrammarCompiler(
                self.tokenizer, self.model_config.vocab_size, self.eos_token_ids
            )
        return self._grammars

    def _guide(self, params: SamplingParams) -> Guide | None:
        if params.guided is None:
            return None
        return self.grammar_compiler().guide(params.guided)

    def check_request(self, prompt: Seq[int], params: SamplingParams) -> None:
        """RequestError / SamplingParamsError if the request can never run here.

        Reads only immutable config, so services may call it from any thread before queueing.
        """
        if not prompt:
            raise RequestError("prompt is empty")
        if len(prompt) >= self.max_model_len:
            raise RequestError(
                f"prompt has {len(prompt)} tokens; the limit is "
                f"{self.max_model_len - 1} (context {self.max_model_len})"
            )
        params.validate(self.model_config.vocab_size, None)
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise RequestError(f"prompt token ids must be in [0, {vocab})")

    def check_resume(self, prompt: Seq[int], params: SamplingParams, resume: Seq[int]) -> None:
        """RequestError unless `resume` can be the output so far of `prompt` under `params`:
        ids in the vocabulary, fewer than max_tokens, prompt + resume within the context.
        Like check_request, safe from any thread."""
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in resume):
            raise RequestError(f"resume token ids must be in [0, {vocab})")
        if len(resume) >= params.max_tokens:
            raise RequestError(
                f"{len(resume)} resume tokens leave nothing to generate (max_tokens "
                f"{params.max_tokens})"
            )
        if len(prompt) + len(resume) >= self.max_model_len:
            raise RequestError(
                f"prompt ({len(prompt)}) + resume ({len(resume)}) tokens leave no room in the "
                f"context ({self.max_model_len})"
            )

    def _stop_checker(self, seq: Sequence, params: SamplingParams) -> StopChecker:
        if params.stop and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer; this model has none")
        # The detokenizer's context is everything before the first token it will be shown.
        return StopChecker(params, self.eos_token_ids, self.tokenizer, list(seq.all_token_ids))
