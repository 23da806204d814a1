"""`splitserve bench engine`: our engine against transformers' static batching, per dtype.

Phases: measure the machine's peaks (matmul FLOP/s per dtype, copy bandwidth), then for each
dtype: load the HF model, run the workload as static batches, time a single-request decode;
build our engine, run the same workload all at once, time the same single-request decode.
Everything is measured in this one process. The last line printed is exactly
`throughput_ratio_vs_hf: X.XX`, the lower of the dtypes' workload throughput ratios.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any

from splitserve.bench import report
from splitserve.bench.phases import Phases
from splitserve.bench.report import format_table, mib, pct
from splitserve.bench.workload import (
    BenchRequest,
    DecodeResult,
    ThroughputResult,
    WorkloadSpec,
    check_generated,
    make_workload,
    random_prompt,
    ratio,
)

if TYPE_CHECKING:
    from splitserve.bench.roofline import DecodeTraffic, Peaks, Roofline
    from splitserve.engine.engine import LLMEngine
    from splitserve.engine.sampling_params import SamplingParams
    from splitserve.model.loader import Checkpoint

MIB = report.MIB
FINAL_KEY = "throughput_ratio_vs_hf"


@dataclass(frozen=True)
class BenchSettings:
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    hf_batch_size: int = 8
    single_prompt_len: int = 128
    single_decode_tokens: int = 128  # after the first token, which the prefill yields
    # KV pool slots / the workload's total tokens: small enough that the workload fills it (peak
    # slot use > 0.9), large enough that it never has to preempt and recompute.
    kv_fraction: float = 0.85
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # prefill chunks big enough for efficient matmuls
    matmul_size: int = 2048
    copy_bytes: int = 256 * MIB


FULL = BenchSettings()
# Long enough prompts that half-filled tail blocks don't dominate a pool this small.
QUICK = BenchSettings(
    WorkloadSpec(8, (64, 160), (16, 48)),
    single_prompt_len=32,
    single_decode_tokens=32,
    matmul_size=1024,
    copy_bytes=64 * MIB,
)


def add_parser(bsub: Any) -> None:
    p = bsub.add_parser(
        "engine",
        help="engine throughput and decode speed vs HF transformers generate",
        description="Run a fixed random workload through HF transformers (static batches of 8, "
        "left-padded) and through our engine (continuous batching, a KV pool smaller than the "
        "workload), per dtype; report throughput ratios, single-request decode speed, a "
        f"roofline estimate and KV utilization. The last line is `{FINAL_KEY}: X.XX`.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="8 short requests: a smoke test of the harness, not a measurement",
    )
    p.add_argument(
        "--dtypes",
        default="float32,bfloat16",
        help="comma-separated dtypes to run (default: %(default)s)",
    )
    p.add_argument("--json", default=None, metavar="PATH", help="write all results as JSON")
    p.add_argument("--plot", default=None, metavar="PATH", help="write a bar chart (PNG)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads for both")
    p.add_argument("--seed", type=int, default=0, help="workload seed (default: %(default)s)")
    p.set_defaults(run=run)


# ---- results -------------------------------------------------------------------------------
@dataclass
class KVReport:
    num_blocks: int
    block_size: int
    pool_bytes: int
    weight_bytes: int  # the model's parameters, for scale
    workload_tokens: int  # every request's prompt + output tokens
    peak_slot_usage: float
    peak_block_usage: float
    num_preemptions: int
    num_steps: int
    prefix_hit_rate: float


@dataclass
class DtypeResult:
    dtype: str
    hf: ThroughputResult
    hf_decode: DecodeResult
    ours: ThroughputResult
    ours_decode: DecodeResult
    kv: KVReport
    roofline: Roofline  # the workload run
    single_traffic: DecodeTraffic  # the single-request decode

    @property
    def throughput_ratio(self) -> float:
        return ratio(self.ours.tokens_per_s, self.hf.tokens_per_s)

    @property
    def decode_ratio(self) -> float:
        return ratio(self.ours_decode.tokens_per_s, self.hf_decode.tokens_per_s)


def final_line(results: list[DtypeResult]) -> str:
    return report.final_line(FINAL_KEY, min(r.throughput_ratio for r in results))


# ---- our engine ----------------------------------------------------------------------------
def kv_pool_blocks(
    requests: list[BenchRequest], block_size: int, fraction: float, min_tokens: int = 0
) -> int:
    """A pool of `fraction` of the workload's tokens, but never too small for one request."""
    total = sum(r.total_len for r in requests)
    longest = max(min_tokens, *(r.total_len for r in requests))
    return max(math.ceil(fraction * total / block_size), -(-longest // block_size) + 1)


def exact_greedy(num_tokens: int) -> SamplingParams:
    from splitserve.engine.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=num_tokens, min_tokens=num_tokens, temperature=0, ignore_eos=True
    )


@dataclass
class EngineRun:
    traffic: DecodeTraffic
    generated_tokens: int = 0
    first_token_time: float | None = None
    last_token_time: float = 0.0


def drive(engine: LLMEngine, weight_bytes: int, kv_bytes_per_token: int) -> EngineRun:
    """Step until idle, noting token times and what each pure-decode step had to read."""
    from splitserve.bench.roofline import DecodeTraffic

    bm, run = engine.block_manager, EngineRun(DecodeTraffic())
    while engine.has_unfinished_requests():
        slots, tokens = bm.num_used_slots, engine.stats.num_batched_tokens
        start = time.perf_counter()
        outs = engine.step()
        now = time.perf_counter()
        num_new = engine.stats.num_batched_tokens - tokens
        if num_new and num_new == engine.stats.last_batch_size:  # each sequence decoded one
            run.traffic.add_step(now - start, weight_bytes, (slots + num_new) * kv_bytes_per_token)
        if outs:
            run.first_token_time = run.first_token_time or now
            run.last_token_time = now
            run.generated_tokens += sum(len(o.new_token_ids) for o in outs)
    return run


def warm_up_engine(engine: LLMEngine, vocab_size: int) -> None:
    """One short request, then forget it: an empty prefix cache and fresh statistics."""
    from splitserve.engine.outputs import EngineStats

    prompt = random_prompt(random.Random(-1), 16, vocab_size)
    engine.generate([prompt], exact_greedy(4))
    engine.block_manager.reset_prefix_cache()
    engine.stats = EngineStats(num_blocks=engine.runner.num_blocks, block_size=engine.block_size)


def run_engine_workload(
    engine: LLMEngine, requests: list[BenchRequest], weight_bytes: int, kv_bytes_per_token: int
) -> tuple[ThroughputResult, DecodeTraffic]:
    """All requests added at once; wall time from the first add to the last token."""
    start = time.perf_counter()
    for r in requests:
        engine.add_request(r.request_id, r.prompt_token_ids, exact_greedy(r.output_len))
    run = drive(engine, weight_bytes, kv_bytes_per_token)
    seconds = time.perf_counter() - start
    check_generated("engine", run.generated_tokens, requests)
    return ThroughputResult(run.generated_tokens, seconds), run.traffic


def run_engine_decode(
    engine: LLMEngine,
    prompt: tuple[int, ...],
    decode_tokens: int,
    weight_bytes: int,
    kv_bytes_per_token: int,
) -> tuple[DecodeResult, DecodeTraffic]:
    """1 + `decode_tokens` tokens; time from the first new token to the last."""
    engine.add_request("single", prompt, exact_greedy(decode_tokens + 1))
    run = drive(engine, weight_bytes, kv_bytes_per_token)
    seconds = run.last_token_time - (run.first_token_time or run.last_token_time)
    return DecodeResult(len(prompt), run.generated_tokens - 1, seconds), run.traffic


def kv_report(engine: LLMEngine, requests: list[BenchRequest]) -> KVReport:
    s = engine.stats
    return KVReport(
        num_blocks=engine.runner.num_blocks,
        block_size=engine.block_size,
        pool_bytes=engine.runner.kv_cache_bytes,
        weight_bytes=engine.runner.weight_bytes,
        workload_tokens=sum(r.total_len for r in requests),
        peak_slot_usage=s.peak_slot_usage,
        peak_block_usage=s.peak_block_usage,
        num_preemptions=s.num_preemptions,
        num_steps=s.num_steps,
        prefix_hit_rate=s.prefix_hit_rate,
    )


# ---- the run -------------------------------------------------------------------------------
@dataclass
class Bench:
    """Everything the per-dtype phases share."""

    settings: BenchSettings
    checkpoint: Checkpoint
    requests: list[BenchRequest]
    single_prompt: tuple[int, ...]
    phases: Phases
    threads: int | None = None
    peaks: Peaks | None = None
    results: list[DtypeResult] = field(default_factory=list)

    def measure_peaks(self, dtypes: list[str], when: str) -> None:
        """Measure the peaks (again), keeping the best seen: the first and last phases."""
        from splitserve.bench.roofline import measure_peaks
        from splitserve.engine.config import parse_dtype

        s = self.settings
        with self.phases(f"machine peaks ({when})"):
            peaks = measure_peaks({d: parse_dtype(d) for d in dtypes}, s.matmul_size, s.copy_bytes)
        self.peaks = peaks if self.peaks is None else self.peaks.best(peaks)

    def run_hf(self, dtype: str, gguf_path: str) -> tuple[ThroughputResult, DecodeResult]:
        import gc

        from splitserve.bench import hf_baseline as hf
        from splitserve.engine.config import parse_dtype

        with self.phases(f"{dtype}: load HF"):
            model = hf.load_hf_model(gguf_path, parse_dtype(dtype))
            hf.warm_up(model, self.requests)
        with self.phases(f"{dtype}: HF workload"):
            throughput = hf.run_static_batches(model, self.requests, self.settings.hf_batch_size)
        with self.phases(f"{dtype}: HF single decode"):
            decode = hf.run_single_decode(
                model, self.single_prompt, self.settings.single_decode_tokens
            )
        del model
        gc.collect()
        return throughput, decode

    def build_engine(self, dtype: str) -> LLMEngine:
        from splitserve.engine.config import EngineConfig
        from splitserve.executors.build import create_engine

        s = self.settings
        longest_single = s.single_prompt_len + s.single_decode_tokens + 1
        cfg = EngineConfig(
            dtype=dtype,
            block_size=s.block_size,
            max_num_seqs=s.max_num_seqs,
            max_num_batched_tokens=s.max_num_batched_tokens,
            num_threads=self.threads,
            num_kv_blocks=kv_pool_blocks(
                self.requests, s.block_size, s.kv_fraction, longest_single
            ),
        )
        engine = create_engine(cfg, self.checkpoint)
        warm_up_engine(engine, self.checkpoint.config.vocab_size)
        return engine

    def run_ours(
        self, dtype: str
    ) -> tuple[ThroughputResult, DecodeResult, KVReport, DecodeTraffic, DecodeTraffic]:
        from splitserve.bench import roofline
        from splitserve.engine.config import parse_dtype

        cfg, torch_dtype = self.checkpoint.config, parse_dtype(dtype)
        weights = roofline.decode_weight_bytes(cfg, torch_dtype)
        kv_token = roofline.kv_bytes_per_token(cfg, torch_dtype)
        with self.phases(f"{dtype}: build engine"):
            engine = self.build_engine(dtype)
        shard = getattr(engine.runner.executor, "shard", None)
        if shard is not None:  # in process: count the weights as the backend stores them
            from splitserve.model.cpu_linear import matmul_weight_bytes

            weights = matmul_weight_bytes(shard.model)
        with self.phases(f"{dtype}: engine workload"):
            throughput, traffic = run_engine_workload(engine, self.requests, weights, kv_token)
            kv = kv_report(engine, self.requests)
        with self.phases(f"{dtype}: engine single decode"):
            decode, single = run_engine_decode(
                engine, self.single_prompt, self.settings.single_decode_tokens, weights, kv_token
            )
        return throughput, decode, kv, traffic, single

    def run_dtype(self, dtype: str, gguf_path: str) -> None:
        from splitserve.bench.roofline import Roofline, workload_flops

        hf, hf_decode = self.run_hf(dtype, gguf_path)
        ours, ours_decode, kv, traffic, single = self.run_ours(dtype)
        flops = workload_flops(self.checkpoint.config, self.requests)
        line = Roofline(flops, ours.seconds, traffic)
        self.results.append(DtypeResult(dtype, hf, hf_decode, ours, ours_decode, kv, line, single))


def parse_dtypes(text: str) -> list[str]:
    from splitserve.engine.config import parse_dtype

    names = [
        str(parse_dtype(d.strip())).removeprefix("torch.") for d in text.split(",") if d.strip()
    ]
    if not names:
        raise ValueError("--dtypes names no dtype")
    return list(dict.fromkeys(names))


def run(args: argparse.Namespace) -> int:
    import torch

    from splitserve.model.loader import default_model_path, open_checkpoint

    dtypes = parse_dtypes(args.dtypes)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    base = QUICK if args.quick else FULL
    settings = replace(base, workload=replace(base.workload, seed=args.seed))
    path = default_model_path()
    ckpt = open_checkpoint(path)
    vocab = ckpt.config.vocab_size
    bench = Bench(
        settings,
        ckpt,
        make_workload(settings.workload, vocab),
        random_prompt(random.Random(args.seed + 1), settings.single_prompt_len, vocab),
        Phases(2 + 6 * len(dtypes), "bench engine"),
        args.threads,
    )
    bench.measure_peaks(dtypes, "start")
    for dtype in dtypes:
        bench.run_dtype(dtype, path)
    bench.measure_peaks(dtypes, "end")
    bench.phases.close()
    doc, plot = partial(json_doc, bench), partial(write_plot, results=bench.results)
    report.finish(args, report_lines(bench), final_line(bench.results), doc, plot)
    return 0


# ---- report --------------------------------------------------------------------------------
def throughput_table(results: list[DtypeResult], s: BenchSettings) -> list[str]:
    work = f"{s.workload.num_requests} requests (HF: batches of {s.hf_batch_size})"
    single = f"1 request decode ({s.single_prompt_len} prompt, {s.single_decode_tokens} new)"
    rows = []
    for r in results:
        rows.append(
            [
                r.dtype,
                work,
                f"{r.ours.tokens_per_s:.1f}",
                f"{r.hf.tokens_per_s:.1f}",
                f"{r.throughput_ratio:.2f}",
            ]
        )
        rows.append(
            [
                r.dtype,
                single,
                f"{r.ours_decode.tokens_per_s:.1f}",
                f"{r.hf_decode.tokens_per_s:.1f}",
                f"{r.decode_ratio:.2f}",
            ]
        )
    return format_table(["dtype", "benchmark", "ours tok/s", "HF tok/s", "ratio"], rows)


def roofline_table(results: list[DtypeResult], peaks: Peaks) -> list[str]:
    header = "ours|GFLOP/s|of peak|decode GB/s (workload)|of peak|decode GB/s (1 request)|of peak"
    rows = []
    for r in results:
        line, single, bw = r.roofline, r.single_traffic, peaks.copy_bandwidth
        rows.append([
            r.dtype, f"{line.achieved_flops / 1e9:.2f}",
            pct(line.flops_fraction(peaks.matmul_flops[r.dtype])),
            f"{line.decode.bytes_per_s / 1e9:.2f}", pct(line.bandwidth_fraction(bw)),
            f"{single.bytes_per_s / 1e9:.2f}", pct(ratio(single.bytes_per_s, bw)),
        ])  # fmt: skip
    return format_table(header.split("|"), rows)


def kv_table(results: list[DtypeResult]) -> list[str]:
    header = "ours|KV pool|weights|pool/workload tokens|peak slot use|peak block use|" \
        "preemptions|steps|prefix hits"  # fmt: skip
    rows = [
        [r.dtype, mib(r.kv.pool_bytes), mib(r.kv.weight_bytes),
         f"{r.kv.num_blocks * r.kv.block_size / r.kv.workload_tokens:.2f}",
         f"{r.kv.peak_slot_usage:.2f}", f"{r.kv.peak_block_usage:.2f}",
         str(r.kv.num_preemptions), str(r.kv.num_steps), pct(r.kv.prefix_hit_rate)]
        for r in results
    ]  # fmt: skip
    return format_table(header.split("|"), rows)


def report_lines(bench: Bench) -> list[str]:
    assert bench.peaks is not None
    w, m, results = bench.settings.workload, report.machine_info(), bench.results
    peaks = ", ".join(
        f"matmul {d} {f / 1e9:.1f} GFLOP/s" for d, f in bench.peaks.matmul_flops.items()
    )
    return [
        f"engine benchmark: {bench.checkpoint.config.name}, {w.num_requests} requests "
        f"(prompt {w.prompt_len[0]}-{w.prompt_len[1]}, output {w.output_len[0]}-"
        f"{w.output_len[1]} tokens, seed {w.seed})",
        f"machine: {m['cpu']}, {m['logical_cpus']} CPUs, {m['torch_threads']} torch threads; "
        f"peaks: {peaks}, copy {bench.peaks.copy_bandwidth / 1e9:.1f} GB/s",
        "",
        *throughput_table(results, bench.settings),
        "",
        *roofline_table(results, bench.peaks),
        "",
        *kv_table(results),
        "",
        f"kv_utilization_peak: {min(r.kv.peak_slot_usage for r in results):.2f}",
        f"preemptions: {sum(r.kv.num_preemptions for r in results)}",
    ]


def result_json(r: DtypeResult, peaks: Peaks) -> dict[str, Any]:
    """The raw fields plus every derived number the table shows."""
    out = asdict(r)
    out.update(
        throughput_ratio=r.throughput_ratio,
        decode_ratio=r.decode_ratio,
        ours_tokens_per_s=r.ours.tokens_per_s,
        hf_tokens_per_s=r.hf.tokens_per_s,
        ours_decode_tokens_per_s=r.ours_decode.tokens_per_s,
        hf_decode_tokens_per_s=r.hf_decode.tokens_per_s,
        achieved_flops=r.roofline.achieved_flops,
        flops_fraction=r.roofline.flops_fraction(peaks.matmul_flops[r.dtype]),
        decode_bytes_per_s=r.roofline.decode.bytes_per_s,
        decode_bandwidth_fraction=r.roofline.bandwidth_fraction(peaks.copy_bandwidth),
        single_decode_bytes_per_s=r.single_traffic.bytes_per_s,
        single_decode_bandwidth_fraction=ratio(r.single_traffic.bytes_per_s, peaks.copy_bandwidth),
    )
    return out


def json_doc(bench: Bench) -> dict[str, Any]:
    assert bench.peaks is not None
    return report.json_document(
        bench.settings,
        peaks=asdict(bench.peaks),
        phase_seconds=bench.phases.seconds,
        results=[result_json(r, bench.peaks) for r in bench.results],
        **{FINAL_KEY: min(r.throughput_ratio for r in bench.results)},
    )


def write_plot(path: str, results: list[DtypeResult]) -> None:
    """Two panels of ours-vs-HF bars per dtype: workload throughput, single-request decode."""

    def draw(fig: Any) -> None:
        panels = [
            ("workload throughput", [(r.ours.tokens_per_s, r.hf.tokens_per_s) for r in results]),
            (
                "single-request decode",
                [(r.ours_decode.tokens_per_s, r.hf_decode.tokens_per_s) for r in results],
            ),
        ]
        for ax, (title, pairs) in zip(fig.subplots(1, 2), panels, strict=True):
            xs = range(len(results))
            ax.bar([x - 0.2 for x in xs], [p[0] for p in pairs], 0.4, label="splitserve")
            ax.bar([x + 0.2 for x in xs], [p[1] for p in pairs], 0.4, label="HF transformers")
            labels = [report.times(ratio(ours, hf)) for ours, hf in pairs]
            report.label_bars(
                ax, zip([x - 0.2 for x in xs], [p[0] for p in pairs], labels, strict=True)
            )
            ax.set_xticks(list(xs), [r.dtype for r in results])
            ax.set_title(title)
            ax.set_ylabel("generated tokens/s")
            ax.legend()

    report.save_plot(path, (10, 4), draw)
