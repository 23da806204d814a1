"""The engine on the real SmolLM2-135M weights against transformers on the same GGUF (fp32).

For 8 varied prompts (tests/hf_golden.py), 64 greedy tokens must equal HF's and the chosen
tokens' logprobs agree within 1e-3: each request alone, all in one batch, on a prefix-cache hit
(here, on one engine), and with chunked prefill forced small, with preemption forced by a tiny
pool, on each linear backend (test_engine_smollm2_configs.py, an engine each).
"""

from __future__ import annotations

import pytest
from hf_golden import NEW_TOKENS
from hf_ref import assert_matches

from splitserve.engine.config import EngineConfig
from splitserve.engine.engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.executors.build import create_engine

pytestmark = pytest.mark.slow

PARAMS = SamplingParams(max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, temperature=0, logprobs=0)


def engine_for(ckpt, **overrides) -> LLMEngine:
    return create_engine(EngineConfig(**{"num_kv_blocks": 256, **overrides}), ckpt)


@pytest.fixture(scope="module")
def engine(smollm2_checkpoint) -> LLMEngine:
    return engine_for(smollm2_checkpoint)


def test_prompts_are_varied(engine_prompts):
    lengths = sorted(len(p) for p in engine_prompts)
    assert len(engine_prompts) >= 8 and lengths[0] < 10 and lengths[-1] > 40


def test_each_alone(engine, engine_prompts, engine_references):
    engine.block_manager.reset_prefix_cache()
    assert_matches([engine.generate([p], PARAMS)[0] for p in engine_prompts], engine_references)


def test_one_batch_of_mixed_lengths(engine, engine_prompts, engine_references):
    engine.block_manager.reset_prefix_cache()
    assert_matches(engine.generate(engine_prompts, PARAMS), engine_references)


def test_prefix_cache_hit(engine, engine_prompts, engine_references):
    engine.generate(engine_prompts, PARAMS)  # warms the cache with every prompt
    outs = engine.generate(engine_prompts, PARAMS)
    long_ones = [p for p in engine_prompts if len(p) > 16]
    assert sum(o.num_cached_tokens for o in outs) >= 16 * len(long_ones)
    assert_matches(outs, engine_references)


def test_text_and_stop_string(engine, smollm2_checkpoint, engine_prompts, engine_references):
    tok = smollm2_checkpoint.tokenizer
    full = engine.generate([engine_prompts[0]], PARAMS)[0]
    assert full.text == tok.decode(engine_references[0][0])
    stop = full.text.split()[2]
    cut = engine.generate(
        [engine_prompts[0]], SamplingParams(max_tokens=NEW_TOKENS, temperature=0, stop=(stop,))
    )[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[: full.text.index(stop)]
