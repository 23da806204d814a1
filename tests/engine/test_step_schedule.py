"""The overlap schedule on its own, over a stand-in runner that records what it is given: groups
split the idle sequences evenly, a sequence is `in_flight` exactly while its step is out, and a
drop hands back every batch in flight with its sequences free again. (The pipeline tests run the
same schedule on real stages: tests/executors/test_pipeline.py.)"""

from dataclasses import dataclass, field

import pytest
import torch

from splitserve.engine.block_manager import BlockManager
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import Scheduler
from splitserve.engine.sequence import Sequence
from splitserve.engine.step_schedule import OverlapSchedule, SerialSchedule, step_schedule

PARAMS = SamplingParams(max_tokens=8, temperature=0)


@dataclass
class Inputs:
    sample_seqs: list[Sequence]


@dataclass
class RecordingRunner:
    """Submit/collect in order, like the pipeline; logits are one zero row per sequence."""

    overlap_groups: int = 2
    submitted: list[list[str]] = field(default_factory=list)
    pending: list[Inputs] = field(default_factory=list)

    def prepare(self, seqs: list[Sequence], num_new: list[int]) -> Inputs:
        return Inputs(list(seqs))

    def execute(self, inputs: Inputs) -> torch.Tensor:
        return torch.zeros(len(inputs.sample_seqs), 4)

    def submit(self, inputs: Inputs) -> None:
        self.submitted.append([s.request_id for s in inputs.sample_seqs])
        self.pending.append(inputs)

    def collect(self) -> torch.Tensor:
        return self.execute(self.pending.pop(0))


def scheduler_with(n: int) -> tuple[Scheduler, list[Sequence]]:
    sched = Scheduler(BlockManager(64, 4, False), max_num_seqs=8, max_num_batched_tokens=64)
    seqs = [Sequence(f"r{i}", [1, 2, 3], PARAMS) for i in range(n)]
    for seq in seqs:
        sched.add(seq)
    return sched, seqs


def test_the_runner_picks_the_schedule():
    sched, _ = scheduler_with(1)
    assert isinstance(step_schedule(RecordingRunner(overlap_groups=0), sched), SerialSchedule)
    assert isinstance(step_schedule(RecordingRunner(overlap_groups=3), sched), OverlapSchedule)


def test_groups_split_the_sequences_and_are_in_flight_until_collected():
    sched, seqs = scheduler_with(5)
    runner = RecordingRunner(overlap_groups=2)
    schedule = OverlapSchedule(runner, sched, groups=2)
    ran = schedule.next()
    assert runner.submitted == [["r0", "r1", "r2"], ["r3", "r4"]]  # 5 over 2 groups
    assert ran is not None and [s.request_id for s in ran.batch.seqs] == ["r0", "r1", "r2"]
    assert [s.in_flight for s in seqs] == [False, False, False, True, True]
    assert schedule.num_in_flight == 1


def test_a_failed_collect_leaves_every_step_to_drop():
    sched, seqs = scheduler_with(4)
    runner = RecordingRunner()
    schedule = OverlapSchedule(runner, sched, groups=2)

    def lost() -> torch.Tensor:
        raise ConnectionError("stage 1 is gone")

    runner.collect = lost  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        schedule.next()
    assert schedule.num_in_flight == 2 and all(s.in_flight for s in seqs)
    dropped = schedule.drop()
    assert [[s.request_id for s in b.seqs] for b in dropped] == [["r0", "r1"], ["r2", "r3"]]
    assert not any(s.in_flight for s in seqs) and schedule.num_in_flight == 0
