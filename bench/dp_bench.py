"""`splitserve bench dp`: data-parallel scaling, one colocated replica against two, in one run.

Each mesh is what `splitserve up --colocated --decode N` starts (router + N colocated workers,
no kvstore), with the same engine flags (`--threads 1` unless given) and every worker pinned
to a core of its own (all its threads, by sched_setaffinity; the router and this client share
the machine). The workload is the same both times: `--requests` requests sent at once, each a
random `--prompt-tokens` prompt and exactly `--output-tokens` greedy tokens (EOS ignored),
best of `--repeats` runs, each under its own cache salt, each started once other processes
leave the machine idle (`--quiet-wait`: on a shared 2-core box anything else running takes a
core from DP=2, not from DP=1). Throughput is output tokens over the wall time from the first
send to the last token, at the client.

One mesh runs at a time (DP=1 first, stopped before DP=2 starts). Also reported: how the
router spread the requests over the replicas (from each worker's metrics), whether DP=2 gave
exactly DP=1's tokens, and how much CPU other processes took during each phase. The last line
printed is exactly `dp_scaling_ratio: X.XX` (DP=2 tok/s / DP=1 tok/s; the target is 1.6).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any

from splitserve.bench import report
from splitserve.bench.cpus import (
    CpuMeter,
    affinity,
    cores_for,
    pin_process,
    process_cpu_seconds,
    wait_for_quiet,
)
from splitserve.bench.report import format_table, pct
from splitserve.bench.workload import (
    BenchRequest,
    ThroughputResult,
    count_same,
    random_prompt,
    ratio,
)

if TYPE_CHECKING:
    from splitserve.bench.mesh_runner import RunningMesh
    from splitserve.bench.phases import Phases

FINAL_KEY = "dp_scaling_ratio"
TARGET = 1.6
REPLICAS = (1, 2)
# The metric a worker bumps when it produces a request's first token: requests per replica.
STARTED_METRIC = "splitserve_worker_time_to_first_token_seconds_count"


@dataclass(frozen=True)
class DPBenchSettings:
    requests: int = 32
    prompt_tokens: int = 64
    output_tokens: int = 64
    repeats: int = 2  # best of: another process stealing a core only ever slows a run down
    warmup_output_tokens: int = 4
    seed: int = 0
    pin: bool = True
    # Before each run, wait up to this long for other processes to leave the cores idle (their
    # share under `quiet_threshold` for two 1-s windows in a row); 0 = don't wait.
    quiet_wait_s: float = 180.0
    quiet_threshold: float = 0.05
    startup_timeout_s: float = 300.0
    probe_s: float = 3.0  # per core_scaling measurement; 0 = no probe

    def __post_init__(self) -> None:
        for name in ("requests", "prompt_tokens", "output_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")


QUICK = DPBenchSettings(
    requests=4, prompt_tokens=16, output_tokens=4, repeats=1, quiet_wait_s=0.0, probe_s=0.5
)


def add_parser(bsub: Any) -> None:
    from splitserve.executors.flags import add_engine_args

    p = bsub.add_parser(
        "dp",
        help="data parallelism: a mesh of 2 colocated replicas vs 1, same workload, same run",
        description="Start a mesh with one colocated replica, then one with two (each worker "
        "on one thread and pinned to its own core), send the same concurrent workload through "
        "the router, and print the throughput ratio. The last line is "
        f"`{FINAL_KEY}: X.XX`.",
    )
    d = DPBenchSettings()
    p.add_argument(
        "--requests", type=int, default=d.requests, help="sent at once (default: %(default)s)"
    )
    p.add_argument(
        "--prompt-tokens", type=int, default=d.prompt_tokens, help="per request (%(default)s)"
    )
    p.add_argument(
        "--output-tokens", type=int, default=d.output_tokens, help="per request (%(default)s)"
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=d.repeats,
        help="runs per mesh; the fastest counts (default: %(default)s)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK.requests} requests of {QUICK.prompt_tokens}+{QUICK.output_tokens} tokens, "
        "1 run: a smoke test of the harness, not a measurement",
    )
    p.add_argument("--no-pin", action="store_true", help="don't pin workers to cores")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=None,
        metavar="S",
        help="before each run, wait up to S seconds until other processes use under 5%% of the "
        f"machine (default: {d.quiet_wait_s:g}; 0 with --quick; 0 = don't wait)",
    )
    p.add_argument(
        "--no-probe",
        action="store_true",
        help="skip measuring the machine's own ceiling (N pinned cores on one matmul vs one core)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="prompt seed (%(default)s)")
    p.add_argument("--json", default=None, metavar="PATH", help="write all results as JSON")
    p.add_argument("--plot", default=None, metavar="PATH", help="write a PNG of the results")
    p.add_argument(
        "--log-dir",
        default=None,
        help="keep each service's log in DIR/dp<N>/<service>.log (default: a temp dir)",
    )
    add_engine_args(p)  # the same engine flags for every worker of both meshes
    p.set_defaults(run=run)


def settings_from_args(args: argparse.Namespace) -> DPBenchSettings:
    base = QUICK if args.quick else DPBenchSettings(
        args.requests, args.prompt_tokens, args.output_tokens, args.repeats
    )  # fmt: skip
    wait = base.quiet_wait_s if args.quiet_wait is None else args.quiet_wait
    if wait < 0:
        raise ValueError("--quiet-wait must be >= 0")
    probe = 0.0 if args.no_probe else base.probe_s
    return replace(base, seed=args.seed, pin=not args.no_pin, quiet_wait_s=wait, probe_s=probe)


def workload(settings: DPBenchSettings, vocab_size: int) -> list[BenchRequest]:
    rng = random.Random(settings.seed)
    return [
        BenchRequest(
            f"req-{i}", random_prompt(rng, settings.prompt_tokens, vocab_size),
            settings.output_tokens,
        )
        for i in range(settings.requests)
    ]  # fmt: skip


# ---- results ---------------------------------------------------------------------------------
@dataclass
class MeshRun:
    replicas: int
    runs: list[ThroughputResult]
    requests_per_replica: dict[str, int] = field(default_factory=dict)  # worker -> requests
    cores: dict[str, list[int]] = field(default_factory=dict)  # worker -> CPUs it may run on
    startup_s: float = 0.0
    others_cpu: float | None = None  # share of the machine other processes took, workload phase
    cpu_s: dict[str, float] = field(default_factory=dict)  # per service and "client", workload
    others_cpu_per_run: list[float | None] = field(default_factory=list)
    quiet_waits_s: list[float] = field(default_factory=list)  # waited before each run

    @property
    def best(self) -> ThroughputResult:
        return min(self.runs, key=lambda r: r.seconds)

    @property
    def tokens_per_s(self) -> float:
        return self.best.tokens_per_s


@dataclass
class DPBenchResult:
    model: str
    settings: DPBenchSettings
    engine_flags: list[str]
    meshes: dict[int, MeshRun] = field(default_factory=dict)
    same_tokens: int = 0  # requests whose DP=2 tokens equal DP=1's
    loadavg: dict[str, float] = field(default_factory=dict)
    # The machine's own ceiling, before DP=1 and after DP=2: all pinned cores together on a
    # decode-shaped matmul, over one core alone (`core_scaling`).
    core_scaling: list[float] = field(default_factory=list)

    @property
    def scaling(self) -> float:
        one, two = self.meshes.get(1), self.meshes.get(2)
        return ratio(two.tokens_per_s, one.tokens_per_s) if one and two else 0.0


# ---- the machine's own ceiling ---------------------------------------------------------------
PROBE_SHAPE = (16, 576, 3072)  # rows x in -> out: a replica's up-projection at 16 sequences


def _probe(cpu: int, seconds: float, out: Any) -> None:
    """Matmuls per second of PROBE_SHAPE on one thread pinned to `cpu` (in a spawned process)."""
    import time

    import torch

    from splitserve.model.cpu_linear import PackedLinear, onednn_available

    os.sched_setaffinity(0, {cpu})
    torch.set_num_threads(1)
    rows, k, n = PROBE_SHAPE
    layer = torch.nn.Linear(k, n, bias=False)
    if onednn_available():
        layer = PackedLinear(layer)  # what the workers run
    x = torch.randn(rows, k)
    with torch.inference_mode():
        for _ in range(20):
            layer(x)
        count, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds:
            layer(x)
            count += 1
    out.put(count / elapsed)


def core_scaling(cpus: Sequence[int], seconds: float = 3.0) -> float:
    """How many times one core's rate `cpus` deliver together, each a one-thread process on
    its own core running the same decode-shaped matmul: the most DP=len(cpus) can scale on
    this machine right now (shared memory bandwidth, a busy host, turbo limits all show)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")

    def rates(on: Sequence[int]) -> list[float]:
        q = ctx.Queue()
        procs = [ctx.Process(target=_probe, args=(c, seconds, q), daemon=True) for c in on]
        for p in procs:
            p.start()
        got = [q.get(timeout=120 + seconds) for _ in procs]
        for p in procs:
            p.join()
        return got

    alone = rates(list(cpus)[:1])[0]
    return sum(rates(cpus)) / alone


# ---- one mesh --------------------------------------------------------------------------------
async def _warm_up(mesh: Any, replicas: int, settings: DPBenchSettings, vocab: int) -> None:
    """A few short requests at once: the router sees every replica, each loads its kernels."""
    from splitserve.bench.mesh_runner import warm_up

    rng = random.Random(f"warmup-{replicas}")
    prompts = [random_prompt(rng, settings.prompt_tokens, vocab) for _ in range(2 * replicas)]
    await warm_up(mesh, "router", prompts, settings.warmup_output_tokens, f"dp{replicas}")


def requests_served(mesh: Any, workers: Sequence[str]) -> dict[str, float]:
    from splitserve.bench.mesh_runner import sample, scrape_metrics

    return {w: sample(scrape_metrics(mesh.metrics_url(w)), STARTED_METRIC) for w in workers}


def cpu_seconds(mesh: Any) -> dict[str, float]:
    """CPU time so far of every mesh service and of this process (the client)."""
    out = {name: process_cpu_seconds(c.proc.pid) for name, c in mesh.mesh.children.items()}
    out["client"] = process_cpu_seconds(os.getpid())
    return out


def run_mesh(
    replicas: int,
    flags: Sequence[str],
    requests: list[BenchRequest],
    settings: DPBenchSettings,
    vocab: int,
    log_dir: str,
    phases: Phases,
) -> tuple[MeshRun, dict[str, list[int]]]:
    """Start DP=`replicas`, pin and warm it up, run the workload `repeats` times, stop it."""
    from splitserve.bench import mesh_runner as mr

    topology = mr.colocated_topology(flags, replicas)
    workers = [w.name for w in topology.workers]
    cores: dict[str, list[int]] = {}

    def pin_and_warm_up(mesh: RunningMesh) -> None:
        pids = [mesh.mesh.children[name].proc.pid for name in workers]
        if settings.pin:
            for pid, cpu in zip(pids, cores_for(replicas, os.sched_getaffinity(0)), strict=True):
                pin_process(pid, {cpu})
        cores.update({name: affinity(pid) for name, pid in zip(workers, pids, strict=True)})
        asyncio.run(_warm_up(mesh, replicas, settings, vocab))

    start, work, stop = (f"DP={replicas}: {p}" for p in ("start + warm-up", "workload", "stop"))
    path, timeout = os.path.join(log_dir, f"dp{replicas}"), settings.startup_timeout_s
    with (
        mr.mesh_in_phases(phases, start, stop, topology, path, timeout, pin_and_warm_up) as mesh,
        phases(work),
    ):
        before, cpu_before = requests_served(mesh, workers), cpu_seconds(mesh)
        result, tokens = _repeat_workload(mesh, replicas, requests, settings)
        cpu_after, after = cpu_seconds(mesh), requests_served(mesh, workers)
        mesh.check_alive()
    share = phases.cpu.get(work)
    result.requests_per_replica = {w: round(after[w] - before[w]) for w in workers}
    result.cores = cores
    result.startup_s = mesh.started_s
    result.others_cpu = share.others_fraction if share is not None else None
    result.cpu_s = {k: cpu_after[k] - cpu_before.get(k, 0.0) for k in cpu_after}
    return result, tokens


def _repeat_workload(
    mesh: RunningMesh, replicas: int, requests: list[BenchRequest], settings: DPBenchSettings
) -> tuple[MeshRun, dict[str, list[int]]]:
    """`repeats` runs, each once the machine is quiet (if asked) and under its own cache salt
    (no run finds another's prompts cached); tokens are the first run's."""
    from splitserve.bench.mesh_runner import run_workload

    result = MeshRun(replicas, [])
    tokens: dict[str, list[int]] = {}
    for k in range(settings.repeats):
        if settings.quiet_wait_s > 0:
            waited, share = wait_for_quiet(
                mesh.pids, settings.quiet_wait_s, settings.quiet_threshold
            )
            result.quiet_waits_s.append(round(waited, 1))
            if share >= settings.quiet_threshold:
                print(
                    f"bench dp: others still use {100 * share:.0f}% of the machine "
                    f"after {waited:.0f} s; running anyway (see others' CPU per run)",
                    file=sys.stderr,
                )
        meter = CpuMeter(mesh.pids)
        meter.start()
        done, got = asyncio.run(run_workload(mesh, "router", requests, f"dp{replicas}-run{k}"))
        result.others_cpu_per_run.append(meter.stop().others_fraction)
        result.runs += done
        tokens = tokens or got
    return result, tokens


# ---- the run ---------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    from splitserve.bench.mesh_runner import bench_errors

    with bench_errors(args.log_dir):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from splitserve.bench.phases import Phases
    from splitserve.launcher.topology import engine_argv
    from splitserve.model.loader import open_checkpoint

    settings = settings_from_args(args)
    if args.threads is None:
        args.threads = 1  # one thread per replica: each owns one core
    ckpt = open_checkpoint(args.model)
    vocab = ckpt.config.vocab_size
    requests = workload(settings, vocab)
    flags = engine_argv(args)
    bench = DPBenchResult(ckpt.config.name, settings, flags)
    phases = Phases(3 * len(REPLICAS), "bench dp")
    tokens: dict[int, dict[str, list[int]]] = {}
    probe_cpus = cores_for(max(REPLICAS), os.sched_getaffinity(0))
    with ExitStack() as stack:
        logs = args.log_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="dp-"))
        if settings.probe_s > 0:
            bench.core_scaling.append(core_scaling(probe_cpus, settings.probe_s))
        for replicas in REPLICAS:
            run_, tokens[replicas] = run_mesh(
                replicas, flags, requests, settings, vocab, logs, phases
            )
            bench.meshes[replicas] = run_
        if settings.probe_s > 0:
            bench.core_scaling.append(core_scaling(probe_cpus, settings.probe_s))
    phases.close()
    bench.same_tokens = count_same(tokens[2], tokens[1])
    bench.loadavg = phases.loadavg
    doc, plot = partial(json_doc, bench, phases), partial(write_plot, bench=bench)
    report.finish(args, report_lines(bench), final_line(bench), doc, plot)
    return 0


# ---- report ----------------------------------------------------------------------------------
def final_line(bench: DPBenchResult) -> str:
    return report.final_line(FINAL_KEY, bench.scaling)


def report_lines(bench: DPBenchResult) -> list[str]:
    s, m = bench.settings, report.machine_info()
    lines = [
        f"DP benchmark: {bench.model}; every worker: {' '.join(bench.engine_flags)}",
        f"machine: {m['cpu']}, {m['logical_cpus']} CPUs{report.load_note(bench.loadavg)}",
        f"workload: {s.requests} concurrent requests, {s.prompt_tokens}-token random prompts, "
        f"{s.output_tokens} output tokens each (greedy, EOS ignored); best of {s.repeats} "
        f"run(s) per mesh; workers {'pinned one per core' if s.pin else 'not pinned'}"
        + (
            f"; before each run, waited for other processes to use < "
            f"{100 * s.quiet_threshold:.0f}% of the machine (up to {s.quiet_wait_s:g} s)"
            if s.quiet_wait_s > 0
            else ""
        ),
        "",
    ]
    one = bench.meshes.get(1)
    rows = []
    for n, r in sorted(bench.meshes.items()):
        rows.append([
            f"{n} colocated replica{'s' if n > 1 else ''}", f"{r.tokens_per_s:.1f}",
            f"{r.best.seconds:.1f}", ", ".join(f"{x.seconds:.1f}" for x in r.runs),
            ", ".join(pct(x) for x in r.others_cpu_per_run) or "-",
            f"{ratio(r.tokens_per_s, one.tokens_per_s):.2f}" if one else "-",
            " / ".join(str(v) for v in r.requests_per_replica.values()),
            " / ".join(",".join(map(str, c)) for c in r.cores.values()),
        ])  # fmt: skip
    header = ["mesh", "tok/s", "best s", "runs s", "others' CPU per run", "vs 1"]
    header += ["requests (all runs)", "cores"]
    lines += format_table(header, rows)
    for n, r in sorted(bench.meshes.items()):
        if r.cpu_s and r.runs:
            wall = sum(x.seconds for x in r.runs)
            used = ", ".join(f"{k} {v / wall:.2f}" for k, v in r.cpu_s.items())
            lines.append(f"DP={n} CPU use during the workload (cores busy on average): {used}")
    if bench.core_scaling:
        rows_, k, n = PROBE_SHAPE
        lines.append(
            f"machine ceiling: {max(REPLICAS)} pinned cores ran a {rows_}x{k} @ {k}x{n} fp32 "
            "matmul (one thread each) at "
            + " / ".join(f"{x:.2f}x" for x in bench.core_scaling)
            + " one core's rate (before DP=1 / after DP=2)"
        )
    verdict = "met" if bench.scaling >= TARGET else "NOT met"
    lines += [
        "",
        f"same tokens at DP=2 as at DP=1: {bench.same_tokens}/{s.requests}",
        f"target: >= {TARGET:.1f}x with 2 replicas: {verdict}",
    ]
    return lines


def result_json(bench: DPBenchResult) -> dict[str, Any]:
    meshes = []
    for n, r in sorted(bench.meshes.items()):
        meshes.append({
            "replicas": n,
            "tokens_per_s": r.tokens_per_s,
            "seconds": r.best.seconds,
            "generated_tokens": r.best.generated_tokens,
            "seconds_per_repeat": [x.seconds for x in r.runs],
            "requests_per_replica": r.requests_per_replica,
            "cores": r.cores,
            "startup_seconds": r.startup_s,
            "others_cpu_fraction": r.others_cpu,
            "others_cpu_fraction_per_run": r.others_cpu_per_run,
            "quiet_wait_seconds_per_run": r.quiet_waits_s,
            "cpu_seconds": r.cpu_s,
        })  # fmt: skip
    return {
        "model": bench.model,
        "engine_flags": bench.engine_flags,
        "meshes": meshes,
        "same_tokens": bench.same_tokens,
        "core_scaling": bench.core_scaling,
        "probe_shape": list(PROBE_SHAPE),
        "requests": bench.settings.requests,
        "target": TARGET,
        "target_met": bench.scaling >= TARGET,
        FINAL_KEY: bench.scaling,
    }


def json_doc(bench: DPBenchResult, phases: Phases) -> dict[str, Any]:
    return report.json_document(bench.settings, **phases.to_json(), **result_json(bench))


def write_plot(path: str, bench: DPBenchResult) -> None:
    """(a) tok/s for 1 and 2 replicas against linear scaling and the target; (b) how the
    router spread the requests over the replicas."""

    def draw(fig: Any) -> None:
        ax_a, ax_b = fig.subplots(1, 2)
        ns = sorted(bench.meshes)
        tps = [bench.meshes[n].tokens_per_s for n in ns]
        labels = [f"{n} replica{'s' if n > 1 else ''}" for n in ns]
        ax_a.bar(labels, tps, color=["tab:gray", "tab:blue"][: len(ns)])
        base = bench.meshes[1].tokens_per_s if 1 in bench.meshes else 0.0
        report.label_bars(ax_a, ((x, t, report.times(ratio(t, base))) for x, t in enumerate(tps)))
        if base:
            ax_a.axhline(2 * base, color="tab:green", ls="--", lw=1, label="linear (2x)")
            ax_a.axhline(TARGET * base, color="tab:red", ls=":", lw=1, label=f"target ({TARGET}x)")
            ax_a.legend(loc="upper left")
        ax_a.set_ylim(0, 1.25 * max([*tps, 2 * base]))
        ax_a.set_ylabel("output tokens/s")
        ax_a.set_title(f"(a) throughput, {bench.settings.requests} concurrent requests")
        for n in ns:
            per = bench.meshes[n].requests_per_replica
            ax_b.bar(
                [f"DP={n}\n{w}" for w in per], list(per.values()),
                color="tab:blue" if n > 1 else "tab:gray",
            )  # fmt: skip
        ax_b.set_ylabel("requests served (all runs)")
        ax_b.set_title("(b) requests per replica (router: prefix_aware)")

    report.save_plot(path, (10, 4.2), draw)
