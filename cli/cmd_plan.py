"""`splitserve plan`: memory, GPU count, bandwidth ceiling and cost for a model on a GPU type.

Pure arithmetic (planner/capacity.py); docs/planning.md explains every formula.
"""

from __future__ import annotations

import argparse
import json

GPU_NAMES = "h100|h200|a100-80g|a100-40g|l4|l40s|mi300x"
MODEL_NAMES = (
    "llama-3-8b, llama-3-70b, llama-3-405b, llama-2-70b, llama-2-7b, mistral-7b, qwen2-72b, "
    "smollm2-135m"
)


def add_parser(sub) -> None:
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
        help=f"a config.json, a GGUF file, a Hugging Face folder, or one of: {MODEL_NAMES}",
    )
    p.add_argument("--gpu", required=True, metavar=GPU_NAMES, help="the GPU type")
    p.add_argument("--context", required=True, metavar="N", help="tokens per sequence (4096 or 4k)")
    p.add_argument("--batch", required=True, metavar="B", help="sequences decoded together")
    p.add_argument(
        "--kv-dtype", default="fp16", metavar="fp16|bf16|fp8|int8|fp32", help="default fp16"
    )
    p.add_argument(
        "--weight-dtype",
        default="fp16",
        metavar="fp16|bf16|fp8|int8|int4|fp32",
        help="default fp16",
    )
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


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def _usd(x: float) -> str:
    return f"${x:,.2f}" if x >= 0.1 else f"${x:.3g}"


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:,.2f} GB"


def format_plan(r) -> str:
    a = r.architecture
    p = r.params
    kvb = r.kv_bytes_per_token // (2 * a["num_layers"] * a["num_kv_heads"] * a["head_dim"])
    nominal = f" ({r.nominal})" if r.nominal else ""
    lines = [
        f"plan: {r.model}{nominal} on {r.gpu_description}, "
        f"{r.batch} x {r.context:,} tokens, weights {r.weight_dtype}, KV {r.kv_dtype}",
        f"model        {a['num_layers']} layers, hidden {a['hidden_size']}, intermediate "
        f"{a['intermediate_size']}, {a['num_heads']} heads / {a['num_kv_heads']} KV heads x "
        f"{a['head_dim']}, vocab {a['vocab_size']}, "
        f"{'tied' if a['tie_word_embeddings'] else 'untied'} embeddings",
        f"parameters   {p['total']:,} ({_count(p['total'])}): embeddings {_count(p['embeddings'])}"
        f", attention {_count(p['attention'])}, MLP {_count(p['mlp'])}, norms "
        f"{_count(p['norms'])}, lm_head {_count(p['lm_head']) if p['lm_head'] else 'tied'}",
        f"weights      {_gb(r.weight_bytes)} ({r.weight_dtype}, "
        f"{r.weight_bytes / p['total']:g} B/param)",
        f"KV cache     {r.kv_bytes_per_token:,} B/token (2 x {a['num_layers']} layers x "
        f"{a['num_kv_heads']} KV heads x {a['head_dim']} x {kvb} B); {r.batch} x {r.context:,} "
        f"tokens: {_gb(r.kv_bytes)} ({r.kv_bytes / 2**30:,.2f} GiB)",
        f"total        {_gb(r.total_bytes)}",
        f"one GPU      {'fits' if r.fits_one_gpu else 'does not fit'}: {_gb(r.total_bytes)} "
        f"{'<=' if r.fits_one_gpu else '>'} {r.usable_gb_per_gpu:,.2f} GB usable "
        f"({r.gpu_memory_gb:g} GB less {r.headroom:.0%} headroom)",
        f"one-GPU rate {r.single_gpu_passes_per_s:,.1f} forward passes/s at most "
        f"(bandwidth / all weight bytes{', if it fit' if not r.fits_one_gpu else ''})",
    ]
    lay = r.layout
    if lay is None:
        lines.append("layout       none fits (see notes)")
    else:
        lo, hi = lay.tokens_per_s_realistic
        c_lo, c_hi = lay.usd_per_m_tokens_realistic
        lines += [
            f"layout       TP={lay.tp} x PP={lay.pp} = {lay.gpus} GPU{'s' if lay.gpus > 1 else ''}"
            f": {lay.gb_per_gpu:,.2f} GB per GPU (weights {lay.weight_gb_per_gpu:,.2f} + KV "
            f"{lay.kv_gb_per_gpu:,.2f}) of {lay.usable_gb_per_gpu:,.2f} GB usable",
            f"ceiling      {lay.passes_per_s:,.1f} forward passes/s ({lay.bound} bound: "
            f"weights per GPU / bandwidth per GPU gives {lay.passes_per_s_bandwidth:,.1f}, "
            f"compute {lay.passes_per_s_compute:,.1f})",
            f"             -> {lay.tokens_per_s_ceiling:,.0f} tokens/s decode at batch "
            f"{r.batch}; {lay.passes_per_s_bandwidth_with_kv:,.1f} passes/s = "
            f"{lay.passes_per_s_bandwidth_with_kv * r.batch:,.0f} tokens/s if every step also "
            "reads the full-context KV",
            f"realistic    {lo:,.0f}-{hi:,.0f} tokens/s (30-40% of the ceiling: the article's "
            "'60-70 % below')",
            f"cost         {_usd(r.usd_per_gpu_hour)}/GPU-hour ({r.price_source}) x {lay.gpus} "
            f"= {_usd(lay.usd_per_hour)}/hour: {_usd(lay.usd_per_m_tokens_ceiling)}/M output "
            f"tokens at the ceiling, {_usd(c_lo)}-{_usd(c_hi)}/M realistic",
        ]
    lines += [f"note         {n}" for n in r.notes]
    return "\n".join(lines)
