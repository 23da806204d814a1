"""An int8 KV cache under pipeline and tensor parallelism: each stage or rank holds its part of
the packed pool, KV moves between processes in that format, and greedy output is the single
process's."""

from __future__ import annotations

import pytest
import torch
from models import LAYOUT_ENGINE, LAYOUT_TINY

from splitserve.engine.config import EngineConfig
from splitserve.engine.sampling_params import SamplingParams
from splitserve.executors.build import create_random_engine
from splitserve.model.kv_quant import QUANTS

BASE = dict(LAYOUT_ENGINE, kv_cache_dtype="int8")
PROMPTS = [[(i * 13 + j * 5) % 290 + 3 for j in range(n)] for i, n in enumerate((3, 21, 9))]
PARAMS = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
LAYOUTS = {
    "pp2": dict(pipeline_stages=2, pipeline_layers=(3, 1), pipeline_schedule="step"),
    "tp2": dict(tensor_parallel_size=2),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_int8_kv_under_parallelism_matches_one_process(layout):
    single = create_random_engine(LAYOUT_TINY, EngineConfig(**BASE))
    ref = single.generate(PROMPTS, PARAMS)
    engine = create_random_engine(LAYOUT_TINY, EngineConfig(**BASE, **LAYOUTS[layout]))
    try:
        got = engine.generate(PROMPTS, PARAMS)
        assert [o.new_token_ids for o in got] == [o.new_token_ids for o in ref]
        blocks = [0, 5, 9, 13]
        kv = engine.runner.executor.read_kv(blocks)  # gathered from every stage / rank
        hd = LAYOUT_TINY.head_dim
        assert kv.dtype == torch.uint8 and kv.shape == (4, 2, 4, 4, 2, hd + 2)
        quant = QUANTS["int8"]
        mine = quant.dequantize(kv, torch.float32)
        theirs = quant.dequantize(single.runner.executor.read_kv(blocks), torch.float32)
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0.05)
        engine.runner.write_blocks([1, 2, 3, 4], kv)  # scattered back in the same format
        assert torch.equal(engine.runner.executor.read_kv([1, 2, 3, 4]), kv)
        with pytest.raises(ValueError, match="kv_int8"):
            engine.runner.write_blocks([1], quant.dequantize(kv[:, :, :1], torch.float32))
    finally:
        engine.close()
