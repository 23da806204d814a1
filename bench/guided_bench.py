"""What structured outputs cost a decode step: 32 constrained requests against 32 free ones.

    python3 -m splitserve.bench.guided_bench [--batch 32] [--steps 24] [--rounds 2]

In one process, on SmolLM2 (fp32, the default engine): `--batch` requests are added at once
and stepped; only the steps in which all of them decode one token are timed. Free greedy
requests and the same requests under a JSON schema (strings with a minimum length, so no
request can finish inside the timed window) alternate for `--rounds` rounds, so both see the
same machine. Also reported: the share of a constrained step spent in the mask itself
(`grammar_mask`: filling the batch's bitmask on llguidance's threads and unpacking it) and the
schema's compile time in a fresh compiler (first use, and cached). Whole steps are noisy on a
shared machine, so the overhead is also measured paired: one constrained step's logits sampled
with and without its guides, alternating. The last line is `guided_step_overhead: X.XX`, that
paired difference over the median free step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from typing import Any

from splitserve.bench import report

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "minLength": 400},
        "kind": {"enum": ["report", "story", "note"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "score": {"type": "number"},
    },
    "required": ["title", "kind", "tags", "score"],
    "additionalProperties": False,
}
PROMPT = "Write a long report about the history of the printing press, as JSON. Topic {i}:"


def _step_times(engine: Any, prompts: list[list[int]], params: Any, steps: int) -> list[float]:
    import splitserve.engine.sampler as sampler_mod

    for i, p in enumerate(prompts):
        engine.add_request(f"r{time.monotonic_ns()}-{i}", p, params)
    times: list[float] = []
    mask_s = [0.0]
    inner = sampler_mod.grammar_mask

    def timed_mask(*a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        out = inner(*a, **kw)
        mask_s[0] += time.perf_counter() - t
        return out

    sampler_mod.grammar_mask = timed_mask  # type: ignore[assignment]
    masks: list[float] = []
    inner_sample = engine.sampler
    captured: list[Any] = []

    def capturing(logits: Any, rows: Any) -> Any:
        captured[:] = [logits.clone(), list(rows)]
        return inner_sample(logits, rows)

    engine.sampler = capturing
    try:
        while engine.has_unfinished_requests():
            all_decoding = all(
                s.num_computed_tokens >= s.num_tokens - 1 and s.output_token_ids
                for s in (r.seq for r in engine._requests.values())
            )
            full = all_decoding and len(engine._requests) == len(prompts)
            mask_s[0] = 0.0
            t = time.perf_counter()
            engine.step()
            if full and len(times) < steps:
                times.append(time.perf_counter() - t)
                masks.append(mask_s[0])
                _step_times.last = list(captured)  # type: ignore[attr-defined]
            if len(times) >= steps:
                for rid in list(engine._requests):
                    engine.abort_request(rid)
                engine.step()
    finally:
        sampler_mod.grammar_mask = inner  # type: ignore[assignment]
        engine.sampler = inner_sample
    _step_times.masks = masks  # type: ignore[attr-defined]
    return times


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--pairs", type=int, default=30)
    args = ap.parse_args(argv)

    from splitserve.engine.config import EngineConfig
    from splitserve.engine.guided import GrammarCompiler, GuidedSpec
    from splitserve.engine.sampling_params import SamplingParams
    from splitserve.executors.build import create_engine

    engine = create_engine(EngineConfig(num_kv_blocks=1024, num_threads=args.threads))
    tok = engine.tokenizer
    assert tok is not None
    spec = GuidedSpec("json_schema", json.dumps(SCHEMA))
    fresh = GrammarCompiler(tok, engine.model_config.vocab_size, engine.eos_token_ids)
    t = time.perf_counter()
    fresh.ll_tokenizer()
    view_s = time.perf_counter() - t
    t = time.perf_counter()
    fresh.check(spec)
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    fresh.guide(spec)
    cached_s = time.perf_counter() - t

    prompts = [tok.encode(PROMPT.format(i=i)) for i in range(args.batch)]
    free = SamplingParams(max_tokens=args.steps + 8, temperature=0, ignore_eos=True)
    guided = SamplingParams(max_tokens=args.steps + 8, temperature=0, guided=spec)
    _step_times(engine, prompts, free, 2)  # warm-up: kernels, allocator, the guide cache
    _step_times(engine, prompts, guided, 2)
    free_t: list[float] = []
    guided_t: list[float] = []
    masks: list[float] = []
    for _ in range(args.rounds):
        free_t += _step_times(engine, prompts, free, args.steps)
        guided_t += _step_times(engine, prompts, guided, args.steps)
        masks += _step_times.masks  # type: ignore[attr-defined]
    # Paired: the same logits and rows (a timed constrained step's) sampled with and without
    # their guides, alternating call by call, so the machine's noise hits both alike. The
    # sampler is the only part of a step that differs between the two, so this difference
    # over the free step time is the overhead without the forward pass's noise.
    logits, rows = _step_times.last  # type: ignore[attr-defined]
    free_rows = [dataclasses.replace(r, guide=None) for r in rows]
    with_s, without_s = [], []
    for _ in range(args.pairs):
        for rs, out in ((rows, with_s), (free_rows, without_s)):
            t = time.perf_counter()
            engine.sampler(logits, rs)
            out.append(time.perf_counter() - t)
    engine.close()

    f_ms, g_ms = statistics.median(free_t) * 1e3, statistics.median(guided_t) * 1e3
    m_ms = statistics.median(masks) * 1e3
    sw_ms, swo_ms = statistics.median(with_s) * 1e3, statistics.median(without_s) * 1e3
    overhead = (sw_ms - swo_ms) / f_ms
    print(report.machine_info())
    print(f"batch {args.batch}, {len(free_t)} timed decode steps each (median):")
    print(f"  free greedy step       {f_ms:8.2f} ms")
    print(f"  JSON-schema step       {g_ms:8.2f} ms   ({g_ms / f_ms - 1:+.1%}, whole steps)")
    print(f"  of which the mask      {m_ms:8.2f} ms   ({m_ms / f_ms:.1%} of a free step)")
    print(
        f"paired sampler, same logits, {args.pairs} alternating calls (median): with guides "
        f"{sw_ms:.2f} ms, without {swo_ms:.2f} ms -> {overhead:+.1%} of a free step"
    )
    print(f"tokenizer view (once per process): {view_s * 1e3:.0f} ms")
    print(f"schema compile: {compile_s * 1e3:.2f} ms first, {cached_s * 1e3:.3f} ms cached")
    print(report.final_line("guided_step_overhead", round(overhead, 3)))


if __name__ == "__main__":
    main()
