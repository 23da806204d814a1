"""The SmolLM2 engine tests' prompts and transformers answers (tests/hf_golden.py) on engines
set up to take other paths: chunked prefill forced small, preemption forced by a tiny pool, and
each linear backend. An engine per test and no module fixture, so that pytest-xdist spreads
these over its workers instead of queueing them behind test_engine_smollm2.py's."""

from __future__ import annotations

import pytest
from hf_ref import assert_matches
from test_engine_smollm2 import PARAMS, engine_for

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("linear", ["blocks", "onednn"])
def test_each_linear_backend(smollm2_checkpoint, engine_prompts, engine_references, linear):
    # Q4_1/Q8_0 blocks dequantized in the kernel, and every weight as float32 for oneDNN: the
    # same greedy tokens either way (auto picks one of the two, by CPU).
    engine = engine_for(smollm2_checkpoint, linear_backend=linear)
    shard = engine.runner.executor.shard
    if linear == "blocks":
        assert (
            shard.linears == "121 linears and 1 embedding in Q4_1/Q8_0 blocks, 0 packed for oneDNN"
        )
    else:
        assert shard.linears == "0 linears in blocks, 121 packed for oneDNN"
    assert_matches(engine.generate(engine_prompts, PARAMS), engine_references)


def test_chunked_prefill_forced_small(smollm2_checkpoint, engine_prompts, engine_references):
    engine = engine_for(smollm2_checkpoint, max_num_batched_tokens=8, enable_prefix_caching=False)
    assert_matches(engine.generate(engine_prompts, PARAMS), engine_references)


def test_preemption_forced_by_tiny_pool(smollm2_checkpoint, engine_prompts, engine_references):
    engine = engine_for(smollm2_checkpoint, num_kv_blocks=12, enable_prefix_caching=False)
    outs = engine.generate(engine_prompts, PARAMS)
    assert engine.stats.num_preemptions > 0
    assert engine.block_manager.num_free_blocks == 12
    assert_matches(outs, engine_references)
