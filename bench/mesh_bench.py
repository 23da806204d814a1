"""`splitserve bench mesh`: the service mesh against the in-process engine, measured in one run.

(a) Throughput: the engine benchmark's 32 requests (bench/workload.py; `--workload-scale` runs a
    smaller copy, see `scaled_workload`) run by `LLMEngine.generate` in this process, then sent
    concurrently as gRPC Generate calls (token ids) through a router to a colocated mesh (router
    + 1 colocated worker, no kvstore: one engine process does the work), then to a
    disaggregated mesh (1 prefill + 1 decode + kvstore, disaggregate=true), for information.
    Same engine flags everywhere.
(b) Time to first token at the client for requests sharing a ~1,000-token system prompt, sent
    one at a time with disaggregate=true: cold (a fresh cache salt: in no cache), warm store (the
    prefix was computed by another prefill worker, so this one fetches it from the kvstore) and
    warm local (this prefill worker has it cached).
(c) KV transfer prefill -> decode, from the decode worker's metrics: MB/s and its share of TTFT.
    (b) and (c) are bench/mesh_ttft.py; the meshes and the client, bench/mesh_runner.py.

The baseline runs first and is gone before any mesh process starts; one mesh runs at a time.
The last line printed is exactly `mesh_throughput_ratio_vs_engine: X.XX` (colocated mesh /
in-process engine).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import tempfile
import time
import uuid
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any

from splitserve.bench import report
from splitserve.bench.mesh_ttft import (
    TTFT_CASES,
    ChainKeys,
    SharedPrefixPrompts,
    TransferStats,
    TTFTCase,
    plot_ttft,
    sequential_transfer_rate,
    shared_prefix_prompts,
    transfer_delta,
    transfer_json,
    transfer_table,
    ttft_json,
    ttft_reduction,
    ttft_table,
)
from splitserve.bench.report import format_table, pct
from splitserve.bench.workload import (
    BenchRequest,
    ThroughputResult,
    WorkloadSpec,
    check_generated,
    count_same,
    make_workload,
    random_prompt,
    ratio,
)

if TYPE_CHECKING:
    from splitserve.bench.cpus import CpuShare
    from splitserve.bench.mesh_runner import RunningMesh
    from splitserve.bench.phases import Phases

FINAL_KEY = "mesh_throughput_ratio_vs_engine"
PHASES = (
    "in-process engine: load + warm-up",
    "in-process engine: workload",
    "colocated mesh: start + warm-up",
    "colocated mesh: workload",
    "colocated mesh: stop",
    "disaggregated mesh: start + warm-up",
    "TTFT: cold",
    "TTFT: warm store",
    "TTFT: warm local",
    "disaggregated mesh: workload",
    "disaggregated mesh: stop",
)


@dataclass(frozen=True)
class MeshBenchSettings:
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    # 1 = the engine benchmark's workload as is (10k prompt + 4.4k output tokens, ~45 s per run
    # on 2 cores); below 1 both sides run the same scaled copy (see scaled_workload).
    prompt_scale: float = 1.0
    output_scale: float = 1.0
    # Each side's workload runs this many times back to back and keeps its fastest run:
    # another process stealing the cores only ever slows a run down.
    repeats: int = 2
    ttft_requests: int = 8
    system_prompt_tokens: int = 1000
    suffix_tokens: int = 24
    ttft_output_tokens: int = 4  # the first token is what is timed; a few more end each request
    warmup_prompt_tokens: int = 64
    warmup_output_tokens: int = 4
    startup_timeout_s: float = 300.0


FULL = MeshBenchSettings()
QUICK = MeshBenchSettings(
    WorkloadSpec(num_requests=8),
    prompt_scale=0.1,
    output_scale=0.1,
    repeats=1,
    ttft_requests=2,
    system_prompt_tokens=256,
    suffix_tokens=8,
    ttft_output_tokens=2,
    warmup_prompt_tokens=32,
    warmup_output_tokens=2,
)


def add_parser(bsub: Any) -> None:
    from splitserve.executors.flags import add_engine_args

    p = bsub.add_parser(
        "mesh",
        help="the gRPC mesh vs the in-process engine: throughput, TTFT warm vs cold, KV transfer",
        description="Run one workload through LLMEngine.generate in this process, then through "
        "a colocated mesh and a disaggregated mesh (router, workers, kvstore as separate "
        "processes); measure client-side time to first token for a shared 1,000-token system "
        "prompt cold, warm in the kvstore and warm in the worker's cache; read the KV transfer "
        f"rate from the decode worker's metrics. The last line is `{FINAL_KEY}: X.XX`.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="8 tiny requests, 2 TTFT requests on a 256-token prefix: a smoke test of the "
        "harness, not a measurement",
    )
    p.add_argument(
        "--workload-scale",
        type=float,
        default=None,
        metavar="X",
        help="cut every prompt and output length of the workload to a fraction X, for a faster "
        "run (default: 1, the engine benchmark's workload as is)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        metavar="N",
        help="run each side's throughput workload N times and keep its fastest run (default: "
        "2; 1 with --quick)",
    )
    p.add_argument("--json", default=None, metavar="PATH", help="write all results as JSON")
    p.add_argument("--plot", default=None, metavar="PATH", help="write the three results (PNG)")
    p.add_argument("--seed", type=int, default=0, help="workload seed (default: %(default)s)")
    p.add_argument(
        "--log-dir",
        default=None,
        help="keep each mesh service's log in DIR/<mesh>/<service>.log (default: a temp dir, "
        "removed at the end)",
    )
    add_engine_args(p)  # the same engine flags for the baseline and every worker
    p.set_defaults(run=run)


# ---- workloads -------------------------------------------------------------------------------
def scaled_workload(
    requests: Sequence[BenchRequest], prompt_scale: float, output_scale: float
) -> list[BenchRequest]:
    """The same requests, each prompt cut to its first ceil(len * prompt_scale) tokens and each
    output length scaled to ceil(len * output_scale): same ids, same order, same shape of mix."""
    for name, s in (("prompt_scale", prompt_scale), ("output_scale", output_scale)):
        if not 0 < s <= 1:
            raise ValueError(f"{name} must be in (0, 1]; got {s}")
    return [
        BenchRequest(
            r.request_id,
            r.prompt_token_ids[: math.ceil(r.prompt_len * prompt_scale)],
            math.ceil(r.output_len * output_scale),
        )
        for r in requests
    ]


def bench_workload(settings: MeshBenchSettings, vocab_size: int) -> list[BenchRequest]:
    full = make_workload(settings.workload, vocab_size)
    return scaled_workload(full, settings.prompt_scale, settings.output_scale)


# ---- results ---------------------------------------------------------------------------------
@dataclass
class ThroughputRun:
    name: str
    result: ThroughputResult  # the fastest of `seconds`
    seconds: list[float] = field(default_factory=list)  # every repeat, in order
    same_tokens: int | None = None  # requests whose tokens equal the engine's (greedy)

    @classmethod
    def best_of(cls, name: str, runs: Sequence[ThroughputResult]) -> ThroughputRun:
        best = min(runs, key=lambda r: r.seconds)
        return cls(name, best, [r.seconds for r in runs])

    @property
    def tokens_per_s(self) -> float:
        return self.result.tokens_per_s


@dataclass
class MeshBenchResult:
    model: str
    settings: MeshBenchSettings
    engine_settings: dict[str, Any]
    workload: list[BenchRequest]
    engine: ThroughputRun | None = None
    colocated: ThroughputRun | None = None
    disagg: ThroughputRun | None = None
    ttft: dict[str, TTFTCase] = field(default_factory=dict)
    workload_transfer: TransferStats | None = None
    prefix_blocks: int = 0  # full blocks of the shared system prompt
    startup_seconds: dict[str, float] = field(default_factory=dict)
    loadavg: dict[str, float] = field(default_factory=dict)  # 1-min load at each phase start
    cpu: dict[str, CpuShare] = field(default_factory=dict)  # per phase: ours vs other processes

    @property
    def colocated_ratio(self) -> float:
        assert self.engine and self.colocated
        return ratio(self.colocated.tokens_per_s, self.engine.tokens_per_s)

    @property
    def disagg_ratio(self) -> float:
        assert self.engine and self.disagg
        return ratio(self.disagg.tokens_per_s, self.engine.tokens_per_s)

    def ttft_reduction(self, case: str = "warm_store", stat: str = "mean") -> float:
        return ttft_reduction(self.ttft, case, stat)


# ---- the in-process baseline -----------------------------------------------------------------
def run_engine_baseline(
    args: argparse.Namespace,
    checkpoint: Any,
    requests: list[BenchRequest],
    repeats: int,
    phases: Phases,
) -> tuple[ThroughputRun, dict[str, list[int]], dict[str, Any]]:
    """`LLMEngine.generate` over the whole workload, `repeats` times, prefix cache emptied
    before each (a repeat must not find the previous run's prompts cached)."""
    import gc

    from splitserve.bench.engine_bench import exact_greedy, warm_up_engine
    from splitserve.executors.build import create_engine
    from splitserve.executors.flags import engine_config

    with phases(PHASES[0]):
        engine = create_engine(engine_config(args), checkpoint)
        warm_up_engine(engine, engine.model_config.vocab_size)
    prompts = [r.prompt_token_ids for r in requests]
    params = [exact_greedy(r.output_len) for r in requests]
    runs: list[ThroughputResult] = []
    tokens: dict[str, list[int]] = {}
    with phases(PHASES[1]):
        for _ in range(repeats):
            engine.block_manager.reset_prefix_cache()
            start = time.perf_counter()
            outs = engine.generate(prompts, params)
            seconds = time.perf_counter() - start
            generated = sum(len(o.new_token_ids) for o in outs)
            check_generated("the engine", generated, requests)
            runs.append(ThroughputResult(generated, seconds))
            tokens = tokens or {
                r.request_id: list(o.new_token_ids) for r, o in zip(requests, outs, strict=True)
            }
    info = engine_info(engine)
    del engine, outs
    gc.collect()  # its weights and KV pool are gone before the first mesh process starts
    return ThroughputRun.best_of("in-process engine", runs), tokens, info


def engine_info(engine: Any) -> dict[str, Any]:
    import torch

    cfg = engine.config
    return {
        "dtype": cfg.dtype,
        "block_size": cfg.block_size,
        "kv_blocks": engine.runner.num_blocks,
        "kv_pool_bytes": engine.runner.kv_cache_bytes,
        "max_num_seqs": cfg.max_num_seqs,
        "max_num_batched_tokens": cfg.max_num_batched_tokens,
        "prefix_caching": cfg.enable_prefix_caching,
        "torch_threads": torch.get_num_threads(),
    }


# ---- mesh client sessions --------------------------------------------------------------------
async def _warm_up(
    mesh: RunningMesh, router: str, settings: MeshBenchSettings, vocab: int, tag: str, disagg: bool
) -> None:
    """One short request: the router sees its workers, the workers' kernels are loaded."""
    from splitserve.bench.mesh_runner import warm_up

    prompt = random_prompt(random.Random(tag), settings.warmup_prompt_tokens, vocab)
    disaggregate = True if disagg else None
    await warm_up(mesh, router, [prompt], settings.warmup_output_tokens, tag, disaggregate)


async def warm_up_disagg(mesh: RunningMesh, settings: MeshBenchSettings, vocab: int) -> None:
    await _warm_up(mesh, "router-cold", settings, vocab, "disagg-cold", disagg=True)
    await _warm_up(mesh, "router", settings, vocab, "disagg", disagg=True)


async def run_disagg_session(
    mesh: RunningMesh,
    bench: MeshBenchResult,
    prompts: SharedPrefixPrompts,
    keys: ChainKeys,
    phases: Phases,
) -> dict[str, list[int]]:
    """(b) and (c), then the disaggregated workload; returns that workload's tokens."""
    from splitserve.bench.mesh_runner import run_workload, scrape_metrics
    from splitserve.bench.mesh_ttft import run_case

    bench.prefix_blocks = len(keys.prefix[0])
    for case, phase in zip(TTFT_CASES, PHASES[6:9], strict=True):
        with phases(phase):
            num_tokens = bench.settings.ttft_output_tokens
            bench.ttft[case] = await run_case(case, mesh, prompts, keys, num_tokens)
            mesh.check_alive()
    with phases(PHASES[9]):
        decode_metrics = mesh.metrics_url("decode-0")
        before = scrape_metrics(decode_metrics)
        runs, tokens = await run_workload(
            mesh, "router", bench.workload, "disagg", disaggregate=True
        )
        bench.workload_transfer = transfer_delta(before, scrape_metrics(decode_metrics))
        mesh.check_alive()
    bench.disagg = ThroughputRun.best_of("mesh, disaggregated", runs)
    return tokens


# ---- the run ---------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    from splitserve.bench.mesh_runner import bench_errors

    with bench_errors(args.log_dir):
        return _run(args)


def _settings(args: argparse.Namespace) -> MeshBenchSettings:
    base = QUICK if args.quick else FULL
    s = replace(base, workload=replace(base.workload, seed=args.seed))
    if args.workload_scale is not None:
        s = replace(s, prompt_scale=args.workload_scale, output_scale=args.workload_scale)
    if args.repeats is not None:
        if args.repeats < 1:
            raise ValueError("--repeats must be >= 1")
        s = replace(s, repeats=args.repeats)
    scaled_workload([], s.prompt_scale, s.output_scale)  # validate the scales early
    return s


def _run(args: argparse.Namespace) -> int:
    from splitserve.bench.phases import Phases
    from splitserve.launcher.topology import engine_argv
    from splitserve.model.loader import open_checkpoint

    settings = _settings(args)
    ckpt = open_checkpoint(args.model)
    vocab = ckpt.config.vocab_size
    requests = bench_workload(settings, vocab)
    flags = engine_argv(args)  # what every worker gets: the baseline's exact engine flags
    bench = MeshBenchResult(ckpt.config.name, settings, {}, requests)
    phases = Phases(len(PHASES), "bench mesh")
    with ExitStack() as cleanup:
        logs = args.log_dir or cleanup.enter_context(tempfile.TemporaryDirectory(prefix="mesh-"))
        # (a) The baseline first, alone: its engine is freed before any mesh process starts.
        bench.engine, engine_tokens, bench.engine_settings = run_engine_baseline(
            args, ckpt, requests, settings.repeats, phases
        )
        tokens = run_colocated(bench, flags, vocab, os.path.join(logs, "colocated"), phases)
        bench.colocated.same_tokens = count_same(tokens, engine_tokens)
        prompts = shared_prefix_prompts(settings, vocab, args.seed, uuid.uuid4().hex[:8])
        path = os.path.join(logs, "disaggregated")
        tokens = run_disaggregated(bench, flags, vocab, prompts, path, phases)
        bench.disagg.same_tokens = count_same(tokens, engine_tokens)
    phases.close()
    bench.loadavg = phases.loadavg
    bench.cpu = phases.cpu
    doc, plot = partial(json_doc, bench, phases), partial(write_plot, bench=bench)
    report.finish(args, report_lines(bench), final_line(bench), doc, plot)
    return 0


def run_colocated(
    bench: MeshBenchResult, flags: list[str], vocab: int, log_dir: str, phases: Phases
) -> dict[str, list[int]]:
    """(a) on router + 1 colocated worker: the mesh's tokens (of its first run)."""
    from splitserve.bench import mesh_runner as mr

    s = bench.settings

    def warm(mesh: RunningMesh) -> None:
        asyncio.run(_warm_up(mesh, "router", s, vocab, "colo", False))

    topology = mr.colocated_topology(flags)
    with mr.mesh_in_phases(
        phases, PHASES[2], PHASES[4], topology, log_dir, s.startup_timeout_s, warm
    ) as mesh:
        bench.startup_seconds["colocated"] = mesh.started_s
        with phases(PHASES[3]):
            workload = mr.run_workload(mesh, "router", bench.workload, "colocated", s.repeats)
            runs, tokens = asyncio.run(workload)
            mesh.check_alive()
    bench.colocated = ThroughputRun.best_of("mesh, colocated", runs)
    return tokens


def run_disaggregated(
    bench: MeshBenchResult,
    flags: list[str],
    vocab: int,
    prompts: SharedPrefixPrompts,
    log_dir: str,
    phases: Phases,
) -> dict[str, list[int]]:
    """(b), (c) and the disaggregated workload on kvstore + 2 prefill + 1 decode: the
    workload's tokens."""
    from splitserve.bench import mesh_runner as mr
    from splitserve.engine.hashing import kv_namespace
    from splitserve.router.auth import tenant_of

    s, e = bench.settings, bench.engine_settings

    def warm(mesh: RunningMesh) -> None:
        asyncio.run(warm_up_disagg(mesh, s, vocab))

    topology = mr.disagg_topology(flags)
    with mr.mesh_in_phases(
        phases, PHASES[5], PHASES[10], topology, log_dir, s.startup_timeout_s, warm
    ) as mesh:
        bench.startup_seconds["disaggregated"] = mesh.started_s
        namespace = kv_namespace(bench.model, e["dtype"], e["block_size"])
        tenant = tenant_of(mesh.api_key) if mesh.api_key else None
        keys = ChainKeys.of(prompts, namespace, e["block_size"], tenant)
        return asyncio.run(run_disagg_session(mesh, bench, prompts, keys, phases))


# ---- report ----------------------------------------------------------------------------------
def final_line(bench: MeshBenchResult) -> str:
    return report.final_line(FINAL_KEY, bench.colocated_ratio)


def _others(bench: MeshBenchResult, phase: str) -> str:
    """CPU time other processes took during a phase, as a share of the machine's capacity."""
    share = bench.cpu.get(phase)
    return pct(None if share is None else share.others_fraction)


def workload_line(bench: MeshBenchResult) -> str:
    s, reqs = bench.settings, bench.workload
    prompts, outputs = [r.prompt_len for r in reqs], [r.output_len for r in reqs]
    scaled = ""
    if (s.prompt_scale, s.output_scale) != (1.0, 1.0):
        scaled = f" with prompts x{s.prompt_scale:g} and outputs x{s.output_scale:g}"
    return (
        f"workload: {len(reqs)} concurrent requests, prompts {min(prompts)}-{max(prompts)} "
        f"tokens ({sum(prompts)} total), outputs {min(outputs)}-{max(outputs)} tokens "
        f"({sum(outputs)} total): bench/workload.py seed {s.workload.seed}{scaled}; "
        "greedy, EOS ignored; "
        f"best of {s.repeats} runs per side (the disaggregated mesh: 1 run)"
    )


def throughput_table(bench: MeshBenchResult) -> list[str]:
    assert bench.engine
    rows = []
    for label, run_, phase in (
        ("in-process engine (LLMEngine.generate)", bench.engine, PHASES[1]),
        ("mesh, colocated (router + 1 colocated worker)", bench.colocated, PHASES[3]),
        ("mesh, disaggregated (router + 1 prefill + 1 decode + kvstore)", bench.disagg, PHASES[9]),
    ):
        if run_ is None:
            continue
        n = len(bench.workload)
        rows.append([
            label, f"{run_.tokens_per_s:.1f}", f"{run_.result.seconds:.1f}",
            ", ".join(f"{x:.1f}" for x in run_.seconds),
            f"{ratio(run_.tokens_per_s, bench.engine.tokens_per_s):.2f}",
            "-" if run_ is bench.engine else f"{run_.same_tokens}/{n}",
            _others(bench, phase),
        ])  # fmt: skip
    header = ["(a) setup", "tok/s", "best s", "runs s", "vs engine", "same tokens", "others' CPU"]
    return format_table(header, rows)


def report_lines(bench: MeshBenchResult) -> list[str]:
    e, s, m = bench.engine_settings, bench.settings, report.machine_info()
    lines = [
        f"mesh benchmark: {bench.model}, {e.get('dtype')}; engine everywhere: block "
        f"{e.get('block_size')}, KV pool {e.get('kv_blocks')} blocks "
        f"({e.get('kv_pool_bytes', 0) / 2**20:,.0f} MiB), max_num_seqs {e.get('max_num_seqs')}, "
        f"max_num_batched_tokens {e.get('max_num_batched_tokens')}, torch threads "
        f"{e.get('torch_threads')}",
        f"machine: {m['cpu']}, {m['logical_cpus']} CPUs shared by every process of the run"
        + report.load_note(bench.loadavg, m["logical_cpus"]),
        workload_line(bench),
        "",
        *throughput_table(bench),
    ]
    if bench.ttft:
        lines += [
            "",
            f"TTFT: {s.ttft_requests} sequential requests per case, disaggregate=true: a "
            f"{s.system_prompt_tokens}-token shared system prompt ({bench.prefix_blocks} full "
            f"blocks) + a distinct {s.suffix_tokens}-token suffix, {s.ttft_output_tokens} "
            "tokens out; cold via prefill-0, warm via prefill-1",
            *ttft_table(bench.ttft),
            "CPU taken by other processes during the TTFT phases: "
            + ", ".join(
                f"{case.replace('_', ' ')} {_others(bench, phase)}"
                for case, phase in zip(TTFT_CASES, PHASES[6:9], strict=True)
            ),
            "",
            *transfer_table(bench.ttft, bench.workload_transfer, len(bench.workload)),
            "",
            f"ttft_warm_store_reduction: {pct(bench.ttft_reduction('warm_store'))} (mean), "
            f"{pct(bench.ttft_reduction('warm_store', 'median'))} (median)",
        ]
        if bench.workload_transfer is not None:
            lines.append(f"kv_transfer_mb_per_s: {sequential_transfer_rate(bench.ttft):.0f}")
    lines.append(f"mesh_disaggregated_ratio_vs_engine: {bench.disagg_ratio:.2f}")
    return lines


def result_json(bench: MeshBenchResult) -> dict[str, Any]:
    def run_json(r: ThroughputRun | None) -> dict[str, Any] | None:
        if r is None:
            return None
        return {
            "name": r.name,
            "generated_tokens": r.result.generated_tokens,
            "seconds": r.result.seconds,
            "seconds_per_repeat": r.seconds,
            "tokens_per_s": r.tokens_per_s,
            "same_tokens_as_engine": r.same_tokens,
        }

    return {
        "model": bench.model,
        "engine": bench.engine_settings,
        "workload": {
            "requests": len(bench.workload),
            "prompt_tokens": [r.prompt_len for r in bench.workload],
            "output_tokens": [r.output_len for r in bench.workload],
        },
        "throughput": {
            "engine": run_json(bench.engine),
            "colocated": run_json(bench.colocated),
            "disaggregated": run_json(bench.disagg),
            "colocated_ratio": bench.colocated_ratio,
            "disaggregated_ratio": bench.disagg_ratio,
        },
        "ttft": ttft_json(bench.ttft),
        "prefix_blocks": bench.prefix_blocks,
        "kv_transfer_workload": transfer_json(bench.workload_transfer),
        "kv_transfer_mb_per_s": sequential_transfer_rate(bench.ttft) if bench.ttft else None,
        "mesh_startup_seconds": bench.startup_seconds,
        FINAL_KEY: bench.colocated_ratio,
    }


def json_doc(bench: MeshBenchResult, phases: Phases) -> dict[str, Any]:
    return report.json_document(bench.settings, **phases.to_json(), **result_json(bench))


def write_plot(path: str, bench: MeshBenchResult) -> None:
    """(a) tok/s per setup, (b) TTFT per case (mean bars, median dots), (c) TTFT split into
    KV transfer and the rest, with the transfer rate."""

    def draw(fig: Any) -> None:
        ax_a, ax_b, ax_c = fig.subplots(1, 3)
        _plot_throughput(ax_a, bench)
        plot_ttft(ax_b, ax_c, bench.ttft, bench.settings.system_prompt_tokens)

    report.save_plot(path, (15, 4.5), draw)


def _plot_throughput(ax: Any, bench: MeshBenchResult) -> None:
    assert bench.engine
    runs = [r for r in (bench.engine, bench.colocated, bench.disagg) if r is not None]
    labels = ["in-process\nengine", "mesh\ncolocated", "mesh\ndisaggregated"][: len(runs)]
    tps = [r.tokens_per_s for r in runs]
    ax.bar(labels, tps, color=["tab:gray", "tab:blue", "tab:orange"][: len(runs)])
    base = bench.engine.tokens_per_s
    report.label_bars(ax, ((x, t, report.times(ratio(t, base))) for x, t in enumerate(tps)))
    ax.set_ylim(0, 1.2 * max(tps))
    ax.set_ylabel("generated tokens/s")
    ax.set_title(f"(a) throughput, {len(bench.workload)} concurrent requests")
