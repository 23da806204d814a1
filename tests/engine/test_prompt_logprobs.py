"""Prompt logprobs in the engine, on the real SmolLM2 weights against
transformers on the same GGUF (fp32): every prompt token's logprob within 1e-3 of HF's,
batched with other requests, chunked, and when the prompt's blocks are in the prefix cache (which
must not skip positions whose logits are needed)."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.config import EngineConfig
from splitserve.engine.engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.executors.build import create_engine

pytestmark = pytest.mark.slow

TEXTS = [
    "The quick brown fox jumps over the lazy dog because it was in a hurry to get home.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Paris is the capital of",
]
ECHO = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1)


@pytest.fixture(scope="module")
def prompts(smollm2_checkpoint) -> list[list[int]]:
    return [smollm2_checkpoint.tokenizer.encode(t) for t in TEXTS]


@pytest.fixture(scope="module")
def hf_logprobs(hf_reference, prompts) -> list[torch.Tensor]:
    model, _ = hf_reference
    out = []
    with torch.no_grad():
        for p in prompts:
            logits = model(torch.tensor([p])).logits[0].float()  # (T, V)
            out.append(torch.log_softmax(logits, -1))
    return out


@pytest.fixture(scope="module")
def engine(smollm2_checkpoint) -> LLMEngine:
    return create_engine(EngineConfig(num_kv_blocks=128), smollm2_checkpoint)


def check(outputs, prompts, hf_logprobs) -> None:
    for out, p, ref in zip(outputs, prompts, hf_logprobs, strict=True):
        got = out.prompt_logprobs
        assert got is not None and len(got) == len(p) - 1
        want = ref[torch.arange(len(p) - 1), torch.tensor(p[1:])]
        assert torch.allclose(torch.tensor([lp for lp, _ in got]), want, atol=1e-3)
        for j, (_, top) in enumerate(got):  # top-1: the argmax of HF's distribution
            assert len(top) == 1 and top[0][0] == int(ref[j].argmax())


def test_batched_with_a_plain_request(engine, prompts, hf_logprobs):
    plain = SamplingParams(max_tokens=4, temperature=0)
    outs = engine.generate([*prompts, prompts[0][:5]], [ECHO, ECHO, ECHO, plain])
    check(outs[:3], prompts, hf_logprobs)
    assert outs[3].prompt_logprobs is None


def test_chunked_and_never_from_the_prefix_cache(engine, prompts, hf_logprobs):
    engine.generate(prompts, SamplingParams(max_tokens=1, temperature=0))  # cached now
    hits = engine.stats.prefix_hit_tokens
    budget = engine.scheduler.max_num_batched_tokens
    engine.scheduler.max_num_batched_tokens = 7  # every prompt in chunks of at most 7
    try:
        check(engine.generate(prompts, ECHO), prompts, hf_logprobs)
    finally:
        engine.scheduler.max_num_batched_tokens = budget
    assert engine.stats.prefix_hit_tokens == hits  # computed, not taken from the cache
