"""The engine against transformers on tiny random-weight configs of each architecture variant.

Every variant runs the same scenarios the real model does: alone, one mixed batch, chunked
prefill forced small, preemption forced by a tiny pool, and a prefix-cache hit.
"""

from __future__ import annotations

import random

import pytest
import torch
from hf_ref import assert_matches, hf_greedy
from models import VARIANT_BASE
from transformers import AutoConfig, AutoModelForCausalLM

from splitserve.engine.config import EngineConfig, ModelConfig
from splitserve.engine.engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.executors.runner import ModelRunner

VARIANTS = {
    "llama-gqa-untied": dict(
        model_type="llama", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False
    ),
    "llama-mha-tied": dict(
        model_type="llama", num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True
    ),
    "llama3-rope-scaling": dict(
        model_type="llama",
        num_attention_heads=4,
        num_key_value_heads=1,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=32,
        ),
    ),
    "mistral": dict(
        model_type="mistral",
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=None,
    ),
    "qwen2-bias": dict(
        model_type="qwen2", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True
    ),
}
NEW_TOKENS = 12


def _prompts(n: int = 5) -> list[list[int]]:
    rng = random.Random(7)
    shared = [rng.randrange(3, 300) for _ in range(20)]
    prompts = [[rng.randrange(3, 300) for _ in range(rng.randint(1, 40))] for _ in range(n)]
    prompts.append([*shared, 5, 6, 7])  # two prompts sharing a 20-token prefix
    prompts.append([*shared, 9])
    return prompts


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request):
    kwargs = {**VARIANT_BASE, **VARIANTS[request.param]}
    hf_cfg = AutoConfig.for_model(**kwargs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).eval()
    prompts = _prompts()
    refs = [hf_greedy(model, p, NEW_TOKENS) for p in prompts]
    return model, prompts, refs


def make_engine(model, **overrides) -> LLMEngine:
    cfg = ModelConfig.from_hf(model.config.to_dict())
    ecfg = EngineConfig(**{"num_kv_blocks": 128, "block_size": 4, **overrides})
    return LLMEngine(ecfg, cfg, ModelRunner(cfg, ecfg, model.state_dict().items()))


PARAMS = SamplingParams(max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, temperature=0, logprobs=0)


def test_config_roundtrip(variant):
    model, _, _ = variant
    cfg = ModelConfig.from_hf(model.config.to_dict())
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg


def test_alone(variant):
    model, prompts, refs = variant
    engine = make_engine(model)
    outs = [engine.generate([p], PARAMS)[0] for p in prompts]
    assert_matches(outs, refs)


def test_one_mixed_batch(variant):
    model, prompts, refs = variant
    assert_matches(make_engine(model).generate(prompts, PARAMS), refs)


def test_chunked_prefill(variant):
    model, prompts, refs = variant
    engine = make_engine(model, max_num_batched_tokens=5)
    assert_matches(engine.generate(prompts, PARAMS), refs)


def test_preemption_by_tiny_pool(variant):
    model, prompts, refs = variant
    engine = make_engine(model, num_kv_blocks=16)  # 64 slots for ~7 x 35 tokens
    assert_matches(engine.generate(prompts, PARAMS), refs)
    assert engine.stats.num_preemptions > 0
    assert engine.block_manager.num_free_blocks == 16


def test_prefix_cache_hit(variant):
    model, prompts, refs = variant
    engine = make_engine(model)
    engine.generate(prompts[-2:-1], PARAMS)
    hit_before = engine.stats.prefix_hit_tokens
    out = engine.generate(prompts[-1:], PARAMS)
    assert engine.stats.prefix_hit_tokens - hit_before >= 16
    assert out[0].num_cached_tokens >= 16
    assert_matches(out, refs[-1:])
