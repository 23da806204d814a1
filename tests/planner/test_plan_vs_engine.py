"""`splitserve plan`'s bytes are what the engine allocates, for our model, per choice."""

from __future__ import annotations

import pytest

from splitserve.engine.config import EngineConfig
from splitserve.executors.shard import ModelShard
from splitserve.model.parallel import ShardSpec
from splitserve.planner.capacity import kv_bytes_per_token, plan, weight_bytes
from splitserve.planner.data import BUILTIN_MODELS

SMOLLM2 = BUILTIN_MODELS["smollm2-135m"]
BLOCKS, BLOCK_SIZE = 4, 16


@pytest.fixture(scope="module")
def model_config(smollm2_checkpoint):
    return smollm2_checkpoint.config


def shard(model_config, **engine) -> ModelShard:
    ecfg = EngineConfig(
        num_kv_blocks=BLOCKS, block_size=BLOCK_SIZE, linear_backend="torch", **engine
    )
    return ModelShard(model_config, ecfg, ShardSpec(), BLOCKS, None)  # random weights: sizes only


# planner KV dtype -> the engine's (dtype, kv_cache_dtype)
KV_CHOICES = {
    "fp32": ("float32", "auto"),
    "bf16": ("bfloat16", "auto"),
    "int8": ("float32", "int8"),
    "fp8": ("float32", "fp8_e4m3"),
}


@pytest.mark.parametrize("kv", list(KV_CHOICES))
def test_kv_bytes_per_token_are_the_pools(model_config, kv):
    dtype, kv_cache_dtype = KV_CHOICES[kv]
    s = shard(model_config, dtype=dtype, kv_cache_dtype=kv_cache_dtype)
    assert s.kv_cache_bytes == kv_bytes_per_token(SMOLLM2, kv) * BLOCKS * BLOCK_SIZE
    r = plan("smollm2-135m", "l4", 1024, 8, kv_dtype=kv)
    assert r.kv_bytes == kv_bytes_per_token(SMOLLM2, kv) * 1024 * 8


@pytest.mark.parametrize(
    "weights,quantization", [("fp32", "none"), ("int8", "int8"), ("int4", "int4")]
)
def test_weight_bytes_are_the_engines(model_config, weights, quantization):
    s = shard(model_config, quantization=quantization)
    held = s.weight_bytes
    planned = weight_bytes(SMOLLM2, weights)
    # the engine runs float32 on this CPU, so its norms are 4 bytes where a GPU's are 2 (the
    # planner's): 61 x 576 norm weights, 70 kB of 135-540 MB
    norms = (30 * 2 + 1) * 576 * (0 if weights == "fp32" else 2)
    assert held == pytest.approx(planned + norms, rel=1e-4), (held, planned)
    assert plan("smollm2-135m", "l4", 1024, 8, weight_dtype=weights).weight_bytes == planned


def test_the_8bit_kv_note_counts_the_scales():
    r = plan("smollm2-135m", "l4", 8192, 16, kv_dtype="int8")
    assert any("1.94x as many sequences per GB as fp16" in n for n in r.notes), r.notes
