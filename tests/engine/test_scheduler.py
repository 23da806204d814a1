"""The scheduler's group mode (the pipeline's overlap schedule): sequences with a step in
flight (`Sequence.in_flight`) are neither scheduled nor preempted, and a group has at most
`max_seqs` sequences."""

from splitserve.engine.block_manager import BlockManager
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import Scheduler
from splitserve.engine.sequence import Sequence, SequenceStatus

PARAMS = SamplingParams(max_tokens=8, temperature=0)


def running(sched: Scheduler, n: int, prompt_tokens: int) -> list[Sequence]:
    """n sequences prefilled and decoding, each with one sampled token to compute next."""
    seqs = [Sequence(f"r{i}", list(range(1, prompt_tokens + 1)), PARAMS) for i in range(n)]
    for seq in seqs:
        sched.add(seq)
    batch = sched.schedule()
    assert batch.seqs == seqs and not batch.preempted
    for seq, n_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
        seq.num_computed_tokens += n_new
        seq.append_token(7)
    return seqs


def in_flight(*seqs: Sequence) -> None:
    """Mark exactly these sequences as having a step in flight."""
    for seq in seqs:
        seq.in_flight = True


def land(*seqs: Sequence) -> None:
    for seq in seqs:
        seq.in_flight = False


def test_busy_sequences_are_skipped_and_groups_are_capped():
    sched = Scheduler(BlockManager(64, 4, False), max_num_seqs=8, max_num_batched_tokens=64)
    a, b, c, d = running(sched, 4, prompt_tokens=3)
    in_flight(a, c)
    group = sched.schedule()
    assert group.seqs == [b, d] and group.num_new_tokens == [1, 1]
    in_flight(b, d)
    assert sched.schedule().seqs == []
    land(b, c, d)
    assert sched.schedule(max_seqs=1).seqs == [b]


def test_waiting_sequences_join_within_the_cap():
    sched = Scheduler(BlockManager(64, 4, False), max_num_seqs=8, max_num_batched_tokens=64)
    (a,) = running(sched, 1, prompt_tokens=3)
    late = [Sequence(f"w{i}", [1, 2, 3], PARAMS) for i in range(3)]
    for seq in late:
        sched.add(seq)
    in_flight(a)
    group = sched.schedule(max_seqs=2)
    assert group.seqs == late[:2]
    assert list(sched.waiting) == late[2:]


def test_a_sequence_in_flight_is_never_the_preemption_victim():
    # 4 blocks of 4 slots; each sequence holds one full block and needs a second to decode.
    bm = BlockManager(4, 4, False)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a, b, c, d = running(sched, 4, prompt_tokens=4)
    assert bm.num_free_blocks == 0
    # d, the newest, is in flight: c goes to free a block for a, and b preempts itself.
    in_flight(d)
    group = sched.schedule()
    assert group.seqs == [a]
    assert group.preempted == [c, b]
    assert d.status is SequenceStatus.RUNNING and d.block_table
    assert sched.running == [a, d]
