"""The engine on the real SmolLM2-135M weights against transformers on the same GGUF (fp32).

For 8 varied prompts, 64 greedy tokens must equal HF's and the chosen tokens' logprobs agree
within 1e-3: each request alone, all in one batch, with chunked prefill forced small, with
preemption forced by a tiny pool, and on a prefix-cache hit.
"""

from __future__ import annotations

import pytest
from hf_ref import assert_matches, hf_greedy

from splitserve.engine.config import EngineConfig
from splitserve.engine.engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.executors.build import create_engine

pytestmark = pytest.mark.slow

NEW_TOKENS = 64
CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain recursion to a five-year-old, in two sentences.",
    "List three prime numbers greater than 100.",
    "Translate 'good morning, how are you?' into Spanish and German.",
]
RAW = [
    "def fibonacci(n):\n    ",
    "The quick brown fox",
    "Once upon a time, in a small village by the mountains, there lived an old clockmaker who",
]
PARAMS = SamplingParams(max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, temperature=0, logprobs=0)


@pytest.fixture(scope="module")
def prompts(smollm2_checkpoint) -> list[list[int]]:
    tok = smollm2_checkpoint.tokenizer
    chats = [
        tok.encode(
            tok.apply_chat_template([{"role": "user", "content": c}]), add_special_tokens=False
        )
        for c in CHATS
    ]
    return chats + [tok.encode(r) for r in RAW]


@pytest.fixture(scope="module")
def references(hf_reference, prompts):
    model, _ = hf_reference
    return [hf_greedy(model, p, NEW_TOKENS) for p in prompts]


def engine_for(ckpt, **overrides) -> LLMEngine:
    return create_engine(EngineConfig(**{"num_kv_blocks": 256, **overrides}), ckpt)


@pytest.fixture(scope="module")
def engine(smollm2_checkpoint) -> LLMEngine:
    return engine_for(smollm2_checkpoint)


def test_prompts_are_varied(prompts):
    lengths = sorted(len(p) for p in prompts)
    assert len(prompts) >= 8 and lengths[0] < 10 and lengths[-1] > 40


def test_each_alone(engine, prompts, references):
    engine.block_manager.reset_prefix_cache()
    assert_matches([engine.generate([p], PARAMS)[0] for p in prompts], references)


def test_one_batch_of_mixed_lengths(engine, prompts, references):
    engine.block_manager.reset_prefix_cache()
    assert_matches(engine.generate(prompts, PARAMS), references)


def test_prefix_cache_hit(engine, prompts, references):
    engine.generate(prompts, PARAMS)  # warms the cache with every prompt
    outs = engine.generate(prompts, PARAMS)
    assert sum(o.num_cached_tokens for o in outs) >= 16 * len([p for p in prompts if len(p) > 16])
    assert_matches(outs, references)


@pytest.mark.parametrize("linear", ["blocks", "onednn"])
def test_each_linear_backend(smollm2_checkpoint, prompts, references, linear):
    # Q4_1/Q8_0 blocks dequantized in the kernel, and every weight as float32 for oneDNN: the
    # same greedy tokens either way (auto picks one of the two, by CPU).
    engine = engine_for(smollm2_checkpoint, linear_backend=linear)
    shard = engine.runner.executor.shard
    if linear == "blocks":
        assert (
            shard.linears == "121 linears and 1 embedding in Q4_1/Q8_0 blocks, 0 packed for oneDNN"
        )
    else:
        assert shard.linears == "0 linears in Q4_1/Q8_0 blocks, 121 packed for oneDNN"
    assert_matches(engine.generate(prompts, PARAMS), references)


def test_chunked_prefill_forced_small(smollm2_checkpoint, prompts, references):
    engine = engine_for(smollm2_checkpoint, max_num_batched_tokens=8, enable_prefix_caching=False)
    assert_matches(engine.generate(prompts, PARAMS), references)


def test_preemption_forced_by_tiny_pool(smollm2_checkpoint, prompts, references):
    engine = engine_for(smollm2_checkpoint, num_kv_blocks=12, enable_prefix_caching=False)
    outs = engine.generate(prompts, PARAMS)
    assert engine.stats.num_preemptions > 0
    assert engine.block_manager.num_free_blocks == 12
    assert_matches(outs, references)


def test_text_and_stop_string(engine, smollm2_checkpoint, prompts, references):
    tok = smollm2_checkpoint.tokenizer
    full = engine.generate([prompts[0]], PARAMS)[0]
    assert full.text == tok.decode(references[0][0])
    stop = full.text.split()[2]
    cut = engine.generate(
        [prompts[0]], SamplingParams(max_tokens=NEW_TOKENS, temperature=0, stop=(stop,))
    )[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[: full.text.index(stop)]
