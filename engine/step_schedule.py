"""Step schedules: when the engine's steps run on the runner.

A step is always the same moves: the scheduler picks a batch, the runner prepares and runs it,
the engine samples its logits. A schedule decides how runs overlap:

- `SerialSchedule`: one step at a time. The batch is every sequence the budget allows, and
  `next` returns once its logits exist.
- `OverlapSchedule` (the pipeline's `overlap` schedule): the running sequences form up to
  `groups` disjoint groups whose steps are in flight at once (`Runner.submit`), so the stages
  never wait for a whole batch to be sampled. Each `next` first submits a step for every group
  that has none in flight, then collects the oldest. A sequence is marked `in_flight` from its
  step's submission until that step is collected or dropped; the scheduler leaves it alone.

The engine picks its schedule once, from the runner (`step_schedule`), and its `step` reads
the same under either. When a run fails, the engine `drop`s what is in flight.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Generic, Protocol

import torch

from splitserve.engine.runner import InputsT, Runner
from splitserve.engine.scheduler import ScheduledBatch, Scheduler


@dataclass
class Ran(Generic[InputsT]):
    """A step back from the runner: its batch, its inputs and the logits of
    `inputs.sample_seqs`."""

    batch: ScheduledBatch
    inputs: InputsT
    logits: torch.Tensor


class StepSchedule(Protocol):
    @property
    def num_in_flight(self) -> int:
        """Steps submitted and not collected."""
        ...

    def next(self) -> Ran[Any] | None:
        """The next step, run to its logits; None when there is nothing to run."""
        ...

    def drop(self) -> list[ScheduledBatch]:
        """Forget the steps in flight (the runner failed and lost them); their batches, oldest
        first, with their sequences no longer in flight."""
        ...


class SerialSchedule(Generic[InputsT]):
    """One step at a time: schedule, prepare, execute."""

    num_in_flight = 0

    def __init__(self, runner: Runner[InputsT], scheduler: Scheduler) -> None:
        self.runner = runner
        self.scheduler = scheduler

    def next(self) -> Ran[InputsT] | None:
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return None
        inputs = self.runner.prepare(batch.seqs, batch.num_new_tokens)
        return Ran(batch, inputs, self.runner.execute(inputs))

    def drop(self) -> list[ScheduledBatch]:
        return []


class OverlapSchedule(Generic[InputsT]):
    """Up to `groups` steps of disjoint sequence groups in flight; collected oldest first."""

    def __init__(self, runner: Runner[InputsT], scheduler: Scheduler, groups: int) -> None:
        self.runner = runner
        self.scheduler = scheduler
        self.groups = groups
        self._in_flight: deque[tuple[ScheduledBatch, InputsT]] = deque()

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    def next(self) -> Ran[InputsT] | None:
        while len(self._in_flight) < self.groups and self._submit_group():
            pass
        if not self._in_flight:
            return None
        batch, inputs = self._in_flight[0]  # dropped with the rest if collecting fails
        logits = self.runner.collect()
        self._in_flight.popleft()
        _land(batch)
        return Ran(batch, inputs, logits)

    def drop(self) -> list[ScheduledBatch]:
        batches = [batch for batch, _ in self._in_flight]
        self._in_flight.clear()
        for batch in batches:
            _land(batch)
        return batches

    def _submit_group(self) -> bool:
        """Schedule the sequences with no step in flight, as many as an even split of them
        over the groups not in flight gives, and submit their step."""
        busy = sum(len(batch.seqs) for batch, _ in self._in_flight)
        idle = self.scheduler.num_seqs - busy
        share = max(1, -(-idle // (self.groups - len(self._in_flight))))
        batch = self.scheduler.schedule(max_seqs=share)
        if not batch.seqs:
            return False
        inputs = self.runner.prepare(batch.seqs, batch.num_new_tokens)
        self.runner.submit(inputs)
        for seq in batch.seqs:
            seq.in_flight = True
        self._in_flight.append((batch, inputs))
        return True


def _land(batch: ScheduledBatch) -> None:
    for seq in batch.seqs:
        seq.in_flight = False


def step_schedule(runner: Runner[Any], scheduler: Scheduler) -> StepSchedule:
    """The runner's schedule: overlapped when it takes several steps in flight."""
    groups = runner.overlap_groups
    if groups:
        return OverlapSchedule(runner, scheduler, groups)
    return SerialSchedule(runner, scheduler)
