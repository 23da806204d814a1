"""Continuous batching: which sequences run this step, and how many tokens each computes.

A step is a map sequence -> number of new tokens, bounded by a token budget. Running sequences
go first (decodes and unfinished prefill chunks, oldest first); waiting sequences are admitted
after them only while the budget, the batch-size cap and the KV pool allow. When a running
sequence can't get a block, the newest running sequence is preempted: its blocks are returned
and it goes back to the front of the queue to be recomputed later. The pool never overflows.

Under the pipeline's overlap schedule (engine/step_schedule.py) the engine schedules one
group at a time, with a cap on the group's size: sequences whose previous step is still in
flight (`Sequence.in_flight`) are neither scheduled nor preempted. `on_preempt` hears of every
preemption as it happens (the engine counts them).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from splitserve.engine.block_manager import BlockManager
from splitserve.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


@dataclass
class Scheduler:
    block_manager: BlockManager
    max_num_seqs: int
    max_num_batched_tokens: int
    namespace: bytes = b""
    # keep this fraction of blocks free when admitting, so decodes can grow without thrashing
    admission_watermark: float = 0.01
    waiting: deque[Sequence] = field(default_factory=deque)
    running: list[Sequence] = field(default_factory=list)
    on_preempt: Callable[[Sequence], None] | None = None

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, max_seqs: int | None = None) -> ScheduledBatch:
        """The next batch, of the sequences not in flight. `max_seqs`: at most this many
        sequences in the batch (default: `max_num_seqs`)."""
        batch = ScheduledBatch()
        cap = self.max_num_seqs if max_seqs is None else max_seqs
        budget = self._schedule_running(batch, self.max_num_batched_tokens, cap)
        if not batch.preempted:
            self._schedule_waiting(batch, budget, cap)
        return batch

    @property
    def num_seqs(self) -> int:
        return len(self.running) + len(self.waiting)

    def finish(self, seq: Sequence) -> None:
        """Take `seq` out of the queues and return its blocks. Safe to call in any state."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED

    def _schedule_running(self, batch: ScheduledBatch, budget: int, cap: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0 and len(batch) < cap:
            seq = self.running[i]
            if seq.in_flight:
                i += 1
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.block_manager.allocate_slots(seq, n):
                # the newest that isn't in flight: `seq` itself at the latest
                victim = next(s for s in reversed(self.running) if not s.in_flight)
                self._preempt(victim, batch)
                if victim is seq:
                    break
            else:
                batch.seqs.append(seq)
                batch.num_new_tokens.append(n)
                budget -= n
                i += 1
        return budget

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int, cap: int) -> None:
        bm = self.block_manager
        reserve = int(bm.num_blocks * self.admission_watermark)
        while (
            self.waiting
            and budget > 0
            and len(self.running) < self.max_num_seqs
            and len(batch) < cap
        ):
            seq = self.waiting[0]
            hashes = seq.block_hashes(bm.block_size, self.namespace)
            # Prompt logprobs need every prompt position's logits: no cached prefix for them.
            cached = (
                [] if seq.needs_prompt_logits else bm.find_cached_prefix(hashes, seq.num_tokens)
            )
            n = min(seq.num_tokens - len(cached) * bm.block_size, budget)
            need = bm.blocks_needed(seq.num_tokens) - len(cached)
            if bm.num_free_blocks - need < reserve and self.running:
                break
            if not bm.allocate_slots(seq, n, cached):
                break
            self.waiting.popleft()
            if seq.num_preemptions == 0:  # a resumed request's own output is not prompt
                seq.num_cached_prompt_tokens = min(
                    len(cached) * bm.block_size, seq.num_prompt_tokens
                )
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)
        if self.on_preempt is not None:
            self.on_preempt(seq)
