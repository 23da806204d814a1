"""`splitserve bench linear`: one model pass of matmuls, per backend, at decode and prefill rows.

A decode step's matmuls are every layer's QKV, O, gate/up and down plus the LM head, each read
once. This benchmark builds exactly those weights from the checkpoint (layer 0's, repeated
once per layer so they stream from memory as a real pass does, and the head once) and times
one pass through them with x of M rows, for the `blocks` backend (Q4_1/Q8_0 dequantized in the
kernel), the same blocks with int8 activations (`blocks-int8`, VNNI dot products), the
oneDNN packed backend and `nn.Linear`, and for the weights `--quantization`
makes at load (model/quant_linear.py: torch's `_weight_int8pack_mm` per channel and
`_weight_int4pack_mm_for_cpu` in groups of 32, bfloat16 activations). The ratios are against
oneDNN in the same run; every backend's output is compared with `nn.Linear`'s on the same input
(int8/int4 differ by their rounding, not only the order of additions).
"""

from __future__ import annotations

import time
from typing import Any

from splitserve.bench.report import final_line, finish, times

FINAL_KEY = "linear_blocks_vs_onednn_at_16_rows"
# timed besides blocks, onednn and torch; blocks-int8-vnni is blocks-int8 with its AMX path
# switched off (the same numbers: on a CPU with AMX, how much the tiles gain)
QUANTIZED = ("blocks-int8", "blocks-int8-vnni", "int8", "int4")
LAYER_WEIGHTS = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}


def add_parser(bsub: Any) -> None:
    p = bsub.add_parser(
        "linear",
        help="a model pass of matmuls: Q4_1/Q8_0 blocks vs oneDNN vs nn.Linear",
        description="Time one pass through the model's matmuls (every layer's QKV, O, gate/up, "
        "down and the LM head) with M input rows, per linear backend, on one thread by "
        f"default. The last line is `{FINAL_KEY}: X.XX`.",
    )
    p.add_argument("--rows", default="1,4,16,32,128,512", help="M values (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--seconds", type=float, default=1.0, help="time per measurement (1.0)")
    p.add_argument("--model", default=None, help="a GGUF file (default: SmolLM2-135M Q4_1)")
    p.add_argument(
        "--quick", action="store_true", help="M=1,16, 2 layers, 0.1 s: a smoke test, no measure"
    )
    p.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    p.add_argument(
        "--backends",
        default=",".join(QUANTIZED),
        help="backends to time besides blocks, onednn and torch: blocks-int8 (the same blocks, "
        "int8 activations; AMX tiles from 8 rows where the CPU has them), blocks-int8-vnni "
        "(the same without AMX), int8, int4 (--quantization) (default: %(default)s)",
    )
    p.set_defaults(run=run)


def _weights(model: str | None):
    import torch

    from splitserve.model.loader import open_checkpoint

    ckpt = open_checkpoint(model)
    names = {f"model.layers.0.{p}.weight" for parts in LAYER_WEIGHTS.values() for p in parts}
    head = "lm_head.weight" if not ckpt.config.tie_word_embeddings else "model.embed_tokens.weight"
    refs = {name: ref for name, ref in ckpt.refs() if name in names | {head}}
    tensors = {name: ref.read() for name, ref in refs.items()}
    fused = {
        kind: torch.cat([tensors[f"model.layers.0.{p}.weight"] for p in parts])
        for kind, parts in LAYER_WEIGHTS.items()
    }
    # the file's own blocks for each weight (GGUF), as the engine serves them
    stored = {
        kind: [refs[f"model.layers.0.{p}.weight"].read_blocks() for p in parts]
        for kind, parts in LAYER_WEIGHTS.items()
    }
    stored["head"] = [refs[head].read_blocks()]
    stored = {k: v if all(b is not None for b in v) else None for k, v in stored.items()}
    return ckpt, fused, tensors[head], stored


def _modules(weight, copies: int, backend: str, stored=None):
    from torch import nn

    from splitserve.model.block_linear import to_blocks
    from splitserve.model.cpu_linear import PackedLinear
    from splitserve.model.quant_linear import Int4Linear, Int8Linear

    out = []
    for _ in range(copies):
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        lin.weight.data = weight.clone()
        if backend in ("blocks", "blocks-int8", "blocks-int8-vnni"):
            mod = to_blocks(lin, stored, int8=backend != "blocks")
            if mod is None:
                return None
        elif backend == "int8":
            mod = Int8Linear(lin, use_kernel=True)
        elif backend == "int4":
            mod = Int4Linear(lin, 32, use_kernel=True)
        else:
            mod = PackedLinear(lin) if backend == "onednn" else lin
        out.append(mod)
    return out


def _time(mods: list, x, seconds: float) -> float:
    """Seconds per pass (the fastest of a few timed rounds filling `seconds`)."""
    for m in mods:
        m(x)
    best, spent = float("inf"), 0.0
    while spent < seconds or best == float("inf"):
        start = time.perf_counter()
        for m in mods:
            m(x)
        lap = time.perf_counter() - start
        best, spent = min(best, lap), spent + lap
    return best


def run(args: Any) -> int:
    import torch
    from tqdm import tqdm

    from splitserve.model.block_linear import kernel_usable, load_kernel
    from splitserve.model.cpu_linear import onednn_available

    torch.set_num_threads(args.threads)
    rows = [1, 16] if args.quick else [int(r) for r in args.rows.split(",")]
    seconds = 0.1 if args.quick else args.seconds
    if load_kernel() is None or not onednn_available():
        print("bench linear: needs the block kernel and oneDNN, and one is missing here")
        return 1
    ckpt, fused, head, stored = _weights(args.model)
    layers = ckpt.config.num_layers
    extra = [b for b in args.backends.split(",") if b in QUANTIZED]
    backends = ["blocks", "onednn", "torch", *extra]
    shapes = {**fused, "head": head}
    results: dict[str, dict[str, float]] = {b: {} for b in backends}
    errors: dict[str, float] = {}
    formats: dict[str, str] = {}  # kind -> the kernel format(s) its blocks are in
    total = len(shapes) * len(backends) * len(rows)
    with torch.inference_mode(), tqdm(total=total, desc="bench linear", leave=False) as bar:
        for kind, weight in shapes.items():
            copies = 1 if kind == "head" else (2 if args.quick else layers)
            mods = {b: _modules(weight, copies, b, stored[kind]) for b in backends}
            if mods["blocks"] is None:
                print(f"bench linear: the {kind} weight is not in blocks; nothing to time")
                return 1
            formats[kind] = repr(mods["blocks"][0]).split(", ")[-1].rstrip(")")
            for m in rows:
                x = torch.randn(m, weight.shape[1], generator=torch.Generator().manual_seed(m))
                want = x @ weight.t()
                for b in backends:
                    load_kernel().set_amx(b != "blocks-int8-vnni")
                    sec = _time(mods[b], x, seconds)
                    results[b][str(m)] = results[b].get(str(m), 0.0) + sec
                    err = (mods[b][0](x) - want).abs().max().item()
                    errors[b] = max(errors.get(b, 0.0), err)
                    bar.update()
            del mods
    load_kernel().set_amx(True)
    lines = _report(ckpt.path, layers, rows, results, errors, args.threads, kernel_usable())
    lines.insert(1, "blocks formats: " + ", ".join(f"{k} {v}" for k, v in formats.items()))
    lines += _quant_report(rows, results)
    final = final_line(FINAL_KEY, _ratio(results, 16 if 16 in rows else rows[-1]))
    finish(args, lines, final, lambda: {"rows": rows, "seconds": results, "max_abs_err": errors})
    return 0


def _ratio(results, m: int) -> float:
    return results["onednn"][str(m)] / results["blocks"][str(m)]


def _report(path, layers, rows, results, errors, threads, avx512) -> list[str]:
    import os

    lines = [
        f"one pass of {os.path.basename(path)}'s matmuls ({layers} x QKV, O, gate/up, down + "
        f"LM head), {threads} thread(s); AVX-512 kernel: {'yes' if avx512 else 'no'}",
        f"{'rows':>5}  {'blocks ms':>10}  {'onednn ms':>10}  {'torch ms':>9}  blocks vs onednn",
    ]
    for m in rows:
        b, o, t = (results[k][str(m)] * 1e3 for k in ("blocks", "onednn", "torch"))
        lines.append(f"{m:>5}  {b:>10.1f}  {o:>10.1f}  {t:>9.1f}  {times(_ratio(results, m))}")
    errs = ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
    return [*lines, f"largest |difference| from nn.Linear: {errs}"]


def _quant_report(rows, results) -> list[str]:
    """The quantized-at-load backends' times and their speed vs oneDNN float32 and blocks."""
    kinds = [k for k in QUANTIZED if k in results]
    if not kinds:
        return []
    widths = {k: max(9, len(k) + 3) for k in kinds}
    header = "  ".join(
        f"{k + ' ms':>{widths[k]}}  {'vs onednn':>9}  {'vs blocks':>9}" for k in kinds
    )
    lines = [
        "int8 activations (blocks-int8) and quantized at load (--quantization int8/int4): "
        "ms per pass, and speed vs onednn / vs blocks",
        f"{'rows':>5}  {header}",
    ]
    for m in rows:
        cells = []
        for k in kinds:
            t = results[k][str(m)]
            o, b = results["onednn"][str(m)], results["blocks"][str(m)]
            cells.append(f"{t * 1e3:>{widths[k]}.1f}  {times(o / t):>9}  {times(b / t):>9}")
        lines.append(f"{m:>5}  " + "  ".join(cells))
    return lines
