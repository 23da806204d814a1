"""The engine on CUDA: fp32 greedy tokens equal transformers' (on CPU) on the real weights,
bf16 runs, and the tensor-parallel path works over NCCL with a group of one."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.config import EngineConfig
from splitserve.engine.engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.executors.build import create_engine
from splitserve.executors.runner import plan_num_blocks
from splitserve.model.parallel import ShardSpec
from splitserve.wire.step_wire import StepWire

NEW_TOKENS = 48
TEXTS = [
    "The quick brown fox",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the mountains,",
    "List three prime numbers greater than 100.",
]


@pytest.fixture(scope="module")
def prompts(smollm2_checkpoint) -> list[list[int]]:
    return [smollm2_checkpoint.tokenizer.encode(t) for t in TEXTS]


@pytest.fixture(scope="module")
def references(hf_reference, prompts):
    from hf_ref import hf_greedy

    model, _ = hf_reference
    return [hf_greedy(model, p, NEW_TOKENS) for p in prompts]


def _engine(path: str, **kw) -> LLMEngine:
    cfg = EngineConfig(model=path, device="cuda", kv_cache_memory_bytes=256 << 20, **kw)
    return create_engine(cfg)


def test_fp32_on_cuda_matches_transformers(smollm2_path, prompts, references):
    engine = _engine(smollm2_path)
    params = SamplingParams(max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, temperature=0, logprobs=0)
    outs = engine.generate(prompts, params)
    for i, (out, (tokens, logprobs)) in enumerate(zip(outs, references, strict=True)):
        assert out.new_token_ids == tokens, f"prompt {i}"
        worst = max(abs(a - b) for a, b in zip(out.new_logprobs, logprobs, strict=True))
        assert worst < 1e-3, f"prompt {i}: logprob off by {worst}"
    assert engine.runner.executor.shard.kv_cache.is_cuda


def test_bf16_on_cuda_generates(smollm2_path, prompts):
    engine = _engine(smollm2_path, dtype="bfloat16")
    outs = engine.generate(prompts, SamplingParams(max_tokens=16, temperature=0))
    assert all(len(o.new_token_ids) == 16 or o.finish_reason == "stop" for o in outs)


def test_nccl_group_of_one_equals_the_plain_shard(smollm2_path, smollm2_checkpoint):
    from splitserve.executors.shard import ModelShard
    from splitserve.executors.tensor_parallel import TPExecutor

    cfg = EngineConfig(model=smollm2_path, device="cuda", num_kv_blocks=64)
    mc = smollm2_checkpoint.config
    blocks = plan_num_blocks(mc, cfg)
    tp = TPExecutor(mc, cfg, ShardSpec(), blocks, smollm2_checkpoint.tensors(), 0, None)
    plain = ModelShard(mc, cfg, ShardSpec(), blocks, smollm2_checkpoint.tensors())
    try:
        wire = StepWire([1, 504, 3458, 3093], [0, 1, 2, 3], [0], [4], [[0]], [3])
        torch.testing.assert_close(tp.execute(wire), plain.forward(wire), rtol=1e-4, atol=1e-4)
    finally:
        tp.close()
