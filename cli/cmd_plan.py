"""`splitserve plan`: memory, GPU count, bandwidth ceiling and cost for a model on a GPU type.

Parses the flags and calls the planner (planner/: the arithmetic in capacity.py, its cited
numbers in data.py, the printout in report.py); docs/planning.md explains every formula.
"""

from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    from splitserve.planner.capacity import KV_DTYPE_BYTES, WEIGHT_DTYPE_BYTES
    from splitserve.planner.data import BUILTIN_MODELS, GPUS

    p = sub.add_parser(
        "plan",
        help="size a model for a GPU: memory, TP x PP, throughput ceiling, cost",
        description="Count a model's parameters and KV cache, find the smallest tensor x "
        "pipeline parallel layout of GPUs that holds the weights and a batch of full contexts, "
        "and bound its decode speed by memory bandwidth and its cost per million tokens. "
        "Arithmetic only: nothing is loaded or run. See docs/planning.md.",
    )
    p.add_argument(
        "--model",
        required=True,
        metavar="CONFIG",
        help="a config.json, a GGUF file, a Hugging Face folder, or one of: "
        + ", ".join(BUILTIN_MODELS),
    )
    p.add_argument("--gpu", required=True, metavar="|".join(GPUS), help="the GPU type")
    p.add_argument("--context", required=True, metavar="N", help="tokens per sequence (4096 or 4k)")
    p.add_argument("--batch", required=True, metavar="B", help="sequences decoded together")
    for flag, names in (("--kv-dtype", KV_DTYPE_BYTES), ("--weight-dtype", WEIGHT_DTYPE_BYTES)):
        p.add_argument(flag, default="fp16", metavar="|".join(names), help="default fp16")
    p.add_argument(
        "--gpu-hour-usd",
        default=None,
        metavar="X",
        help="price per GPU-hour (default: the GPU's typical cloud price, shown in the output)",
    )
    p.add_argument(
        "--headroom",
        default="0.1",
        metavar="F",
        help="fraction of each GPU's memory kept free for activations, CUDA context and "
        "fragmentation (default 0.1)",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from splitserve.planner.capacity import plan
    from splitserve.planner.report import format_plan

    price = None if args.gpu_hour_usd is None else _number(args.gpu_hour_usd, "--gpu-hour-usd")
    result = plan(
        args.model,
        args.gpu,
        args.context,
        args.batch,
        kv_dtype=args.kv_dtype,
        weight_dtype=args.weight_dtype,
        usd_per_gpu_hour=price,
        headroom=_number(args.headroom, "--headroom"),
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(format_plan(result))
    return 0


def _number(text: str, what: str) -> float:
    # Parsed here, not by argparse, so a bad value is the usual one-line error.
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{what} must be a number, got {text!r}") from None
