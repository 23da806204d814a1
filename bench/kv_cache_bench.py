"""`splitserve bench kv`: what a low-precision KV cache (`--kv-cache-dtype`) buys and costs.

Three measurements, each against float32 in the same run:

- **capacity**: the engine's own block count (`plan_num_blocks`, what the pool allocates) at the
  same `--kv-cache-mib`, for float32, bfloat16, int8 and fp8_e4m3 KV;
- **decode attention**: one layer's paged decode over `--batch` sequences of `--context` tokens
  at the model's shapes, the C++ kernel and the torch backend, on each pool format (ms a call,
  and the bytes of KV it reads);
- **engine decode** (`--engine-steps` > 0): the real model decoding `--batch` sequences, ms a
  decode step with KV in float32 and in int8 (the weights are the same).

The last line is `kv_int8_capacity_vs_fp32: X.XX`.
"""

from __future__ import annotations

import time
from typing import Any

from splitserve.bench.report import final_line, finish, format_table

FINAL_KEY = "kv_int8_capacity_vs_fp32"
POOLS = [("float32", "auto"), ("bfloat16", "auto"), ("float32", "int8"), ("float32", "fp8_e4m3")]


def add_parser(bsub: Any) -> None:
    p = bsub.add_parser(
        "kv",
        help="KV cache at low precision: capacity, decode attention and decode step vs float32",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("--model", default=None, help="a GGUF file or HF folder (default: SmolLM2)")
    p.add_argument("--kv-cache-mib", type=int, default=512, help="pool budget (%(default)s)")
    p.add_argument("--batch", type=int, default=32, help="decoding sequences (%(default)s)")
    p.add_argument("--context", type=int, default=1024, help="tokens each (%(default)s)")
    p.add_argument("--seconds", type=float, default=1.0, help="time per kernel measurement")
    p.add_argument("--engine-steps", type=int, default=16, help="decode steps timed (0: skip)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    p.set_defaults(run=run)


def capacity(cfg: Any, mib: int) -> list[dict[str, Any]]:
    from splitserve.engine.config import EngineConfig
    from splitserve.executors.runner import plan_num_blocks

    out = []
    for dtype, kv in POOLS:
        engine = EngineConfig(dtype=dtype, kv_cache_dtype=kv, kv_cache_memory_bytes=mib << 20)
        out.append({"pool": kv if kv != "auto" else dtype, "blocks": plan_num_blocks(cfg, engine)})
    for row in out:
        row["vs_float32"] = row["blocks"] / out[0]["blocks"]
    return out


def _time(fn: Any, seconds: float) -> float:
    fn()  # warm (and build the kernel)
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and n >= 3:
            return elapsed / n


def attention(cfg: Any, batch: int, context: int, seconds: float) -> list[dict[str, Any]]:
    import torch

    from splitserve.model.attention import AttentionMetadata, torch_decode
    from splitserve.model.cpu_attention import cpp_decode, load_kernel
    from splitserve.model.kv_quant import QUANTS

    bs, kvh, hd, heads = 16, cfg.num_kv_heads, cfg.head_dim, cfg.num_heads
    per_seq = -(-context // bs)
    num_blocks = batch * per_seq
    g = torch.Generator().manual_seed(0)
    k = torch.randn(num_blocks, bs, kvh, hd, generator=g)
    v = torch.randn(num_blocks, bs, kvh, hd, generator=g)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = [perm[i * per_seq : (i + 1) * per_seq] for i in range(batch)]
    meta = AttentionMetadata.build(bs, tables, [context - 1] * batch, [1] * batch)
    q = torch.randn(batch, heads, hd, generator=g)
    pools = {"float32": (k, v, None)}
    for name in ("int8", "fp8_e4m3"):
        quant = QUANTS[name]
        pools[name] = (quant.quantize(k), quant.quantize(v), quant)
    backends = {"torch": torch_decode}
    if load_kernel() is not None:
        backends["cpp"] = cpp_decode
    rows = []
    for backend, fn in backends.items():
        base = None
        for name, (kc, vc, quant) in pools.items():
            kw = {} if quant is None else {"quant": quant}
            t = _time(lambda fn=fn, kc=kc, vc=vc, kw=kw: fn(q, kc, vc, meta, 0.125, **kw), seconds)
            base = base or t
            read = 2 * batch * context * kvh * kc.shape[-1] * kc.element_size()
            rows.append(
                {
                    "backend": backend,
                    "pool": name,
                    "ms": 1e3 * t,
                    "vs_float32": t / base,
                    "kv_mb_read": read / 1e6,
                }
            )
    return rows


def engine_decode(model: str | None, batch: int, steps: int) -> list[dict[str, Any]]:
    from splitserve.engine.config import EngineConfig
    from splitserve.engine.sampling_params import SamplingParams
    from splitserve.executors.build import create_engine
    from splitserve.model.loader import open_checkpoint

    ckpt = open_checkpoint(model)
    params = SamplingParams(max_tokens=steps + 2, temperature=0, ignore_eos=True)
    rows = []
    for kv in ("auto", "int8"):
        engine = create_engine(
            EngineConfig(model=model, kv_cache_dtype=kv, max_num_seqs=batch), ckpt
        )
        for i in range(batch):
            engine.add_request(f"r{i}", [(i * 31 + j * 7) % 1000 + 10 for j in range(256)], params)
        outputs = 0
        while outputs < batch:  # every prompt prefilled and its first token out
            outputs += len(engine.step())
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        rows.append({"kv": kv, "ms_per_step": 1e3 * (time.perf_counter() - start) / steps})
        del engine
    for row in rows:
        row["vs_float32"] = row["ms_per_step"] / rows[0]["ms_per_step"]
    return rows


def run(args: Any) -> int:
    import torch

    from splitserve.model.loader import open_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = open_checkpoint(args.model).config
    cap = capacity(cfg, args.kv_cache_mib)
    att = attention(cfg, args.batch, args.context, args.seconds)
    eng = engine_decode(args.model, args.batch, args.engine_steps) if args.engine_steps else []
    lines = [f"{cfg.name}: KV pool of {args.kv_cache_mib} MiB, block 16"]
    lines += format_table(
        ["pool", "blocks", "tokens", "vs float32"],
        [
            [r["pool"], str(r["blocks"]), str(16 * r["blocks"]), f"{r['vs_float32']:.2f}x"]
            for r in cap
        ],
    )
    lines += ["", f"decode attention, one layer: {args.batch} sequences x {args.context} tokens"]
    lines += format_table(
        ["backend", "pool", "ms", "vs float32", "KV MB read"],
        [
            [
                r["backend"],
                r["pool"],
                f"{r['ms']:.3f}",
                f"{r['vs_float32']:.2f}x",
                f"{r['kv_mb_read']:.1f}",
            ]
            for r in att
        ],
    )
    if eng:
        lines += ["", f"engine decode step, {args.batch} sequences of 256 prompt tokens"]
        lines += format_table(
            ["KV", "ms a step", "vs float32"],
            [[r["kv"], f"{r['ms_per_step']:.1f}", f"{r['vs_float32']:.2f}x"] for r in eng],
        )
    int8 = next(r for r in cap if r["pool"] == "int8")
    doc = {"capacity": cap, "attention": att, "engine": eng, "args": vars(args) | {"run": None}}
    finish(args, lines, final_line(FINAL_KEY, int8["vs_float32"]), lambda: doc)
    return 0
