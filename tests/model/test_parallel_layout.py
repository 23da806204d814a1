"""Who holds what under TP/PP (model/parallel.py), the step wire, and shards run in-process."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from models import LAYOUT_TINY, SMOLLM2, tiny

from splitserve.engine.config import EngineConfig
from splitserve.executors.runner import plan_num_blocks
from splitserve.executors.shard import ModelShard
from splitserve.model.parallel import (
    ParallelConfigError,
    ShardSpec,
    even_ranges,
    head_split,
    layer_param_count,
    stage_layer_ranges,
)
from splitserve.wire.step_wire import StepWire

TINY = LAYOUT_TINY


def test_even_ranges_cover_everything_once():
    assert even_ranges(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert even_ranges(49152, 2) == [(0, 24576), (24576, 49152)]


def test_heads_follow_their_kv_group_when_split_unevenly():
    # SmolLM2: 3 KV heads of 3 query heads each on 2 ranks -> 2 groups + 1 group.
    a, b = head_split(SMOLLM2, 2, 0), head_split(SMOLLM2, 2, 1)
    assert (a.q_heads, a.kv_heads) == ((0, 6), (0, 2))
    assert (b.q_heads, b.kv_heads) == ((6, 9), (2, 3))


def test_kv_heads_are_replicated_when_fewer_than_ranks():
    cfg = tiny(vocab_size=100, hidden_size=64, intermediate_size=128, num_attention_heads=8)
    splits = [head_split(cfg, 4, r) for r in range(4)]
    assert [s.q_heads for s in splits] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [s.kv_heads for s in splits] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    with pytest.raises(ParallelConfigError):
        head_split(cfg, 3, 0)  # 2 KV heads can't be shared evenly by 3 ranks


def test_stage_ranges_balance_parameters_and_accept_explicit_counts():
    for stages in (1, 2, 3, 4):
        ranges = stage_layer_ranges(SMOLLM2, stages)
        assert ranges[0][0] == 0 and ranges[-1][1] == 30
        assert all(a < b for a, b in ranges)
        assert all(r[1] == s[0] for r, s in itertools.pairwise(ranges))
    # The embedding (and the last stage's copy of the tied head) weigh as ~8 layers each.
    assert stage_layer_ranges(SMOLLM2, 2) == [(0, 15), (15, 30)]
    per_stage = [(b - a) * layer_param_count(SMOLLM2) for a, b in stage_layer_ranges(SMOLLM2, 4)]
    embed = SMOLLM2.vocab_size * SMOLLM2.hidden_size
    per_stage[0] += embed
    per_stage[-1] += embed
    assert max(per_stage) / min(per_stage) < 1.3
    assert stage_layer_ranges(SMOLLM2, 2, [10, 20]) == [(0, 10), (10, 30)]
    for bad in ([10, 10], [0, 30], [30]):
        with pytest.raises(ParallelConfigError):
            stage_layer_ranges(SMOLLM2, 2, bad)
    with pytest.raises(ParallelConfigError):
        stage_layer_ranges(TINY, 5)


def test_every_shard_gets_the_same_block_count_from_the_budget():
    base = EngineConfig(kv_cache_memory_bytes=64 * 1024 * 1024, block_size=16)
    one = plan_num_blocks(SMOLLM2, base)
    # 3 KV heads on 2 ranks: the larger rank (2 heads) sets the count.
    tp2 = plan_num_blocks(SMOLLM2, EngineConfig(**{**base.__dict__, "tensor_parallel_size": 2}))
    assert tp2 == one * 3 // 2
    pp2 = plan_num_blocks(SMOLLM2, EngineConfig(**{**base.__dict__, "pipeline_stages": 2}))
    assert pp2 == one * 2


def _random_wire(rng: random.Random) -> StepWire:
    decodes = rng.randint(0, 5)
    num_new = [1] * decodes + [rng.randint(2, 9) for _ in range(rng.randint(0, 4))]
    if not num_new:
        num_new = [1]
    num_cached = [rng.randint(0, 40) for _ in num_new]
    tables = [
        [rng.randrange(100) for _ in range((c + n + 3) // 4)]
        for c, n in zip(num_cached, num_new, strict=True)
    ]
    ids = [rng.randrange(300) for _ in range(sum(num_new))]
    pos = [p for c, n in zip(num_cached, num_new, strict=True) for p in range(c, c + n)]
    ends = [sum(num_new[: i + 1]) - 1 for i in range(len(num_new))]
    rows = [e for e in ends if rng.random() < 0.8]
    return StepWire(ids, pos, num_cached, num_new, tables, rows)


def test_wire_round_trips_and_splits_into_whole_sequences():
    rng = random.Random(3)
    for _ in range(50):
        wire = _random_wire(rng)
        assert StepWire.from_tensor(wire.to_tensor()) == wire
        for parts in (1, 2, 3, 8):
            pieces = wire.split(parts)
            assert 1 <= len(pieces) <= min(parts, wire.num_seqs)
            assert all(p.num_seqs for p in pieces)
            assert [t for p in pieces for t in p.input_ids] == wire.input_ids
            assert [t for p in pieces for t in p.block_tables] == wire.block_tables
            offsets = [0]
            for p in pieces:
                offsets.append(offsets[-1] + p.num_tokens)
            rows = [r + off for p, off in zip(pieces, offsets, strict=False) for r in p.sample_rows]
            assert rows == wire.sample_rows


def test_a_corrupt_wire_is_rejected():
    flat = _random_wire(random.Random(1)).to_tensor()
    with pytest.raises(ValueError):
        StepWire.from_tensor(flat[:-1])
    with pytest.raises(ValueError):
        StepWire.from_tensor(torch.tensor([1, 2], dtype=torch.int64))


def test_pipeline_shards_chained_in_process_equal_the_whole_model():
    ecfg = EngineConfig(num_kv_blocks=16, block_size=4, attention_backend="torch", seed=5)
    whole = ModelShard(TINY, ecfg, ShardSpec(), 16, None)
    first = ModelShard(TINY, ecfg, ShardSpec(first_layer=0, last_layer=1), 16, None)
    last = ModelShard(TINY, ecfg, ShardSpec(first_layer=1, last_layer=4), 16, None)
    assert first.kv_cache.shape[0] == 1 and last.kv_cache.shape[0] == 3
    prompt = StepWire([5, 9, 2, 7, 1], list(range(5)), [0], [5], [[0, 1]], [4])
    decode = StepWire([3], [5], [5], [1], [[0, 1]], [0])
    for wire in (prompt, decode):
        expected = whole.forward(wire)
        got = last.forward(wire, hidden=first.forward(wire))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # The stages' KV, stacked by layer, is the whole model's KV.
    stacked = torch.cat([first.read_kv([0, 1]), last.read_kv([0, 1])])
    torch.testing.assert_close(stacked, whole.read_kv([0, 1]))
