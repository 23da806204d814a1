"""`--kv-cache-dtype`: the pool's capacity at a fixed budget, preemption, and what it does to
greedy output. The HF-equality suites run with the default (`auto`) and stay as they were."""

import pytest
import torch
from models import SMOLLM2, tiny

from splitserve.engine.config import EngineConfig
from splitserve.engine.sampling_params import SamplingParams
from splitserve.executors.build import create_random_engine
from splitserve.executors.runner import kv_block_bytes, plan_num_blocks

MIB = 1 << 20
# head_dim 64, like SmolLM2: the scale costs 2 bytes per 64 values
WIDE_HEAD = tiny(hidden_size=128, num_attention_heads=2, num_key_value_heads=1)


@pytest.mark.parametrize("kv", ["int8", "fp8_e4m3"])
def test_smollm2_pool_holds_1_9x_bf16_and_3_8x_fp32_tokens(kv):
    """The engine's own block counts for SmolLM2 at the same --kv-cache-mib."""

    def blocks(dtype, kv_cache_dtype="auto"):
        cfg = EngineConfig(
            dtype=dtype, kv_cache_dtype=kv_cache_dtype, kv_cache_memory_bytes=512 * MIB
        )
        return plan_num_blocks(SMOLLM2, cfg)

    low = blocks("bfloat16", kv)
    assert low == blocks("float32", kv)  # the model dtype doesn't matter to an 8-bit pool
    assert low / blocks("bfloat16") >= 1.9
    assert low / blocks("float32") >= 3.8
    # what a block costs: 30 layers x (K, V) x 16 tokens x 3 heads x (64 + 2) bytes
    assert kv_block_bytes(SMOLLM2, 16, torch.bfloat16, kv) == 30 * 2 * 16 * 3 * 66
    assert low * kv_block_bytes(SMOLLM2, 16, torch.bfloat16, kv) <= 512 * MIB


def _engine(kv_cache_dtype, budget_bytes, backend="auto", **kw):
    cfg = EngineConfig(
        kv_cache_dtype=kv_cache_dtype,
        kv_cache_memory_bytes=budget_bytes,
        attention_backend=backend,
        max_num_seqs=8,
        max_num_batched_tokens=kw.pop("max_num_batched_tokens_override", 64),
        **kw,
    )
    return create_random_engine(WIDE_HEAD, cfg)


def test_a_workload_that_preempts_in_float32_fits_in_int8():
    """8 sequences of 16 tokens need 32 blocks of 4 at once. A 64 KiB pool holds 16 of them
    in float32 (2 layers x K,V x 4 tokens x 256 bytes) and 62 in int8 (66 bytes a row)."""
    budget = 64 * 1024
    prompts = [[(i * 11 + j) % 120 + 3 for j in range(8)] for i in range(8)]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    counts = {}
    for kv in ("auto", "int8"):
        engine = _engine(kv, budget, block_size=4)
        counts[kv] = engine.runner.num_blocks
        assert engine.runner.kv_cache_bytes <= budget
        outs = engine.generate(prompts, params)
        assert [len(o.new_token_ids) for o in outs] == [8] * 8
        preemptions = engine.stats.num_preemptions
        if kv == "auto":
            assert preemptions > 0
        else:
            assert preemptions == 0
        assert engine.block_manager.num_free_blocks == engine.runner.num_blocks
    assert counts == {"auto": 16, "int8": 62}


def test_int8_greedy_output_stays_close_to_full_precision(backend="cpp"):
    prompts = [[(i * 5 + j * 3) % 120 + 3 for j in range(12 + 7 * i)] for i in range(4)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=0)
    ref = _engine("auto", 4 * MIB, backend).generate(prompts, params)
    low = _engine("int8", 4 * MIB, backend).generate(prompts, params)
    same = sum(
        a == b
        for r, o in zip(ref, low, strict=True)
        for a, b in zip(r.new_token_ids, o.new_token_ids, strict=True)
    )
    assert same >= 0.9 * 12 * len(prompts)
    first = [(r.new_logprobs[0], o.new_logprobs[0]) for r, o in zip(ref, low, strict=True)]
    assert all(abs(a - b) < 0.05 for a, b in first)


def test_kv_cache_dtype_changes_the_prefix_namespace_and_is_checked():
    auto, int8 = _engine("auto", MIB), _engine("int8", MIB)
    assert auto.namespace != int8.namespace  # int8 blocks never answer for float32 ones
    assert int8.runner.kv_format == "kv_int8" and auto.runner.kv_format == "float32"
    with pytest.raises(ValueError, match="--kv-cache-dtype 'int4'"):
        EngineConfig(kv_cache_dtype="int4")


@pytest.mark.parametrize("kv", ["int8", "fp8_e4m3"])
def test_chunking_a_prompt_does_not_change_what_a_low_precision_cache_gives(kv):
    """Every token attends over quantized K/V, its own chunk's included, so a prompt prefilled
    in chunks of 8 gives what one chunk gives (and what a decode worker adopting it gets)."""
    prompts = [[(j * 7) % 120 + 3 for j in range(40)]]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=0)
    one = _engine(kv, MIB, "cpp").generate(prompts, params)[0]
    chunked = _engine(kv, MIB, "cpp", max_num_batched_tokens_override=8)
    out = chunked.generate(prompts, params)[0]
    assert out.new_token_ids == one.new_token_ids
    torch.testing.assert_close(out.new_logprobs, one.new_logprobs, atol=1e-4, rtol=0)
