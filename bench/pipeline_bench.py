"""`splitserve bench pipeline`: how busy each pipeline stage is, beside the M/(M+P-1) ideal.

For each stage count P (`--stages`) the engine starts once, as a worker would: this process is
stage 0 and starts stages 1..P-1 as processes, each on one torch thread and (unless
`--no-pin`) pinned to a core, stage k on the k-th allowed CPU modulo their number. Layer counts
are balanced by measured compute: a pilot run at the largest M, split by parameter count,
prices a layer (the CPU time of the stages without the head, per layer) and the LM head (the
last stage's CPU time beyond its layers); the counts that even those costs out are then
measured (`--layers P=a,b,...` skips the pilot).
Then for each micro-batch count M (`--micro-batches`): `--batch` requests with random
`--prompt-tokens` prompts are prefilled, decoded for `--warmup-steps`, and over the next
`--steps` decode steps (every step the whole batch, one token each) each stage reports its busy
time (wall time inside its forward). Busy / wall is printed beside the ideal M/(M+P-1) of a
pipeline whose stages take equal time, with the CPU time those forwards used and the share of
the machine other processes took meanwhile; of `--repeats` measurements the one they disturbed
least counts. A P=1 engine on the same batch gives the throughput without a pipeline, for
scale (the best of `--repeats`).

The last line is `pipeline_min_busy_vs_ideal: X.XX`: the lowest stage's busy fraction over
its ideal at the largest M (the target is 0.85, within 15% of the ideal).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any

from splitserve.bench import report
from splitserve.bench.cpus import CpuMeter, pin_process
from splitserve.bench.report import finish, format_table, json_document, save_plot
from splitserve.bench.workload import random_prompt

if TYPE_CHECKING:
    from splitserve.engine.config import ModelConfig
    from splitserve.engine.engine import LLMEngine

FINAL_KEY = "pipeline_min_busy_vs_ideal"
TARGET = 0.85


@dataclass(frozen=True)
class PipelineBenchSettings:
    stages: tuple[int, ...] = (2, 4)
    micro_batches: tuple[int, ...] = (1, 2, 4, 8)
    schedules: tuple[str, ...] = ("overlap", "step")  # the engine's --pipeline-schedule
    layers: tuple[tuple[int, tuple[int, ...]], ...] = ()  # (P, counts) given by hand
    batch: int = 32
    prompt_tokens: int = 16
    warmup_steps: int = 3
    steps: int = 16
    repeats: int = 2  # per (P, M): the run least disturbed by other processes counts
    threads: int = 1
    pin: bool = True
    baseline: bool = True
    seed: int = 0
    model: str | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if min(self.stages) < 2 or min(self.micro_batches) < 1:
            raise ValueError("--stages must be >= 2 and --micro-batches >= 1")
        from splitserve.engine.config import PIPELINE_SCHEDULES

        if not self.schedules or not set(self.schedules) <= set(PIPELINE_SCHEDULES):
            raise ValueError(f"--schedules: one or more of {', '.join(PIPELINE_SCHEDULES)}")
        if min(self.batch, self.prompt_tokens, self.steps, self.threads, self.repeats) < 1:
            raise ValueError("--batch, --prompt-tokens, --steps, --repeats, --threads: >= 1")


QUICK = PipelineBenchSettings(
    stages=(2,), micro_batches=(1, 2), batch=4, prompt_tokens=8, warmup_steps=1, steps=2, repeats=1
)


def add_parser(bsub: Any) -> None:
    p = bsub.add_parser(
        "pipeline",
        help="pipeline parallelism: per-stage busy time vs the M/(M+P-1) ideal",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = PipelineBenchSettings()
    p.add_argument("--model", default=None, help="GGUF file or HF folder (default: SmolLM2)")
    p.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--stages", default="2,4", help="pipeline stage counts (default: %(default)s)")
    p.add_argument("--micro-batches", default="1,2,4,8", help="micro-batch counts (%(default)s)")
    p.add_argument(
        "--schedules",
        default="overlap,step",
        help="the engine's --pipeline-schedule values to measure; the first one is the target's "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--layers",
        action="append",
        default=[],
        metavar="P=N,N,...",
        help="layers per stage for P stages, e.g. 2=18,12 (default: a pilot run measures them)",
    )
    p.add_argument("--batch", type=int, default=d.batch, help="sequences decoded together")
    p.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--steps", type=int, default=d.steps, help="decode steps measured")
    p.add_argument(
        "--repeats",
        type=int,
        default=d.repeats,
        help="measurements per (P, M); the one during which other processes took the least "
        "CPU counts (default: %(default)s)",
    )
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads per stage")
    p.add_argument("--no-pin", action="store_true", help="don't pin stages to cores")
    p.add_argument("--no-baseline", action="store_true", help="skip the P=1 throughput run")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--quick", action="store_true", help="tiny settings: a smoke test only")
    p.add_argument("--json", default=None, metavar="PATH", help="write all results as JSON")
    p.add_argument("--plot", default=None, metavar="PATH", help="write a PNG of the results")
    p.set_defaults(run=run)


def settings_from_args(args: argparse.Namespace) -> PipelineBenchSettings:
    layers = []
    for item in args.layers:
        p, sep, counts = item.partition("=")
        if not sep or not p.isdigit():
            raise ValueError(f"--layers takes P=N,N,...; got {item!r}")
        layers.append((int(p), tuple(int(c) for c in counts.split(","))))
    common = dict(
        layers=tuple(layers),
        repeats=args.repeats if not args.quick else 1,
        threads=args.threads,
        pin=not args.no_pin,
        baseline=not args.no_baseline,
        seed=args.seed,
        model=args.model,
        dtype=args.dtype,
    )
    if args.quick:
        return PipelineBenchSettings(**{**asdict(QUICK), **common})
    return PipelineBenchSettings(
        stages=tuple(int(x) for x in args.stages.split(",")),
        micro_batches=tuple(int(x) for x in args.micro_batches.split(",")),
        schedules=tuple(args.schedules.split(",")),
        batch=args.batch,
        prompt_tokens=args.prompt_tokens,
        warmup_steps=args.warmup_steps,
        steps=args.steps,
        **common,
    )


# ---- layouts ---------------------------------------------------------------------------------
def compute_balanced_layers(cfg: ModelConfig, stages: int) -> tuple[int, ...]:
    """The pilot's layer counts, from parameters alone: every layer costs its parameters, the
    last stage also the LM head (vocab x hidden), the embedding nothing (a lookup)."""
    from splitserve.model.parallel import layer_param_count

    per_layer = layer_param_count(cfg)
    left_layers = cfg.num_layers
    left_cost = cfg.num_layers * per_layer + cfg.vocab_size * cfg.hidden_size
    counts = []
    for i in range(stages - 1):
        share = left_cost / (stages - i)
        n = max(1, min(left_layers - (stages - 1 - i), round(share / per_layer)))
        counts.append(n)
        left_layers -= n
        left_cost -= n * per_layer
    return (*counts, left_layers)


def measured_costs(run: Run) -> tuple[float, float]:
    """(one layer, the LM head) in CPU seconds per wall second of `run`. The stages before the
    last hold only layers (their embedding lookup is noise), so they price a layer; what the
    last stage spent beyond its layers is the head."""
    counts = run.counts
    per_layer = sum(run.cpu[:-1]) / sum(counts[:-1])
    return per_layer, max(0.0, run.cpu[-1] - counts[-1] * per_layer)


def split_by_cost(num_layers: int, stages: int, per_layer: float, head: float) -> tuple[int, ...]:
    """Contiguous layer counts whose costliest stage is cheapest (ties: the most even split).
    The last stage carries the head; of the others, the later ones take any extra layer, since
    stage 0 also schedules and samples on its core."""
    if stages < 2 or num_layers < stages or per_layer <= 0:
        raise ValueError(f"can't split {num_layers} layers over {stages} stages by cost")

    def counts(last: int) -> tuple[int, ...]:
        q, r = divmod(num_layers - last, stages - 1)
        return (*(q + (k >= stages - 1 - r) for k in range(stages - 1)), last)

    def key(last: int) -> tuple[float, float]:
        c = [n * per_layer for n in counts(last)]
        c[-1] += head
        return (round(max(c), 12), max(c) - min(c))

    return counts(min(range(1, num_layers - stages + 2), key=key))


def ideal(m: int, p: int, schedule: str = "step") -> float:
    """A stage's busy fraction when all P stages take equal time and nothing else does.
    step: a step lasts M + P - 1 micro-batch times and a stage works M of them. overlap: M
    groups circulate through the P stages, so with M >= P a stage always has one to run."""
    return min(1.0, m / p) if schedule == "overlap" else m / (m + p - 1)


# ---- results ---------------------------------------------------------------------------------
@dataclass
class Run:
    stages: int
    micro_batches: int
    layers: list[tuple[int, int]]
    wall_s: float
    steps: int
    decode_tokens: int
    busy: list[float]  # per stage: busy seconds / wall seconds
    cpu: list[float]  # per stage: CPU seconds of its forwards / wall seconds
    others_cpu: float  # of the machine's capacity, taken by other processes meanwhile
    schedule: str = "step"

    @property
    def counts(self) -> list[int]:
        """Layers per stage."""
        return [b - a for a, b in self.layers]

    @property
    def ideal(self) -> float:
        return ideal(self.micro_batches, self.stages, self.schedule)

    @property
    def busy_vs_step_ideal(self) -> list[float]:
        """Busy over the M/(M+P-1) of a step-synchronous pipeline, whatever the schedule."""
        return [b / ideal(self.micro_batches, self.stages) for b in self.busy]

    @property
    def busy_vs_ideal(self) -> list[float]:
        return [b / self.ideal for b in self.busy]

    @property
    def step_ms(self) -> float:
        return 1000 * self.wall_s / self.steps

    @property
    def tokens_per_s(self) -> float:
        return self.decode_tokens / self.wall_s


@dataclass
class Pilot:
    """The run that priced a layer and the head for one P, and the counts it led to."""

    run: Run
    per_layer_cpu: float
    head_cpu: float
    layers: tuple[int, ...]

    @property
    def head_layers(self) -> float:
        return self.head_cpu / self.per_layer_cpu


@dataclass
class PipelineBenchResult:
    settings: PipelineBenchSettings
    model: str = ""
    runs: list[Run] = field(default_factory=list)
    baseline_tokens_per_s: float | None = None
    cores: dict[int, list[list[int]]] = field(default_factory=dict)  # P -> CPUs of each stage
    pilots: dict[int, Pilot] = field(default_factory=dict)  # P -> how its layers were chosen
    loadavg: list[float] = field(default_factory=list)  # 1-min load before each P

    def final_ratio(self, schedule: str | None = None) -> float:
        """The least busy stage over its schedule's ideal at the largest M (of the first
        schedule measured, unless given)."""
        schedule = schedule or self.settings.schedules[0]
        top = max(r.micro_batches for r in self.runs)
        return min(
            min(r.busy_vs_ideal)
            for r in self.runs
            if r.micro_batches == top and r.schedule == schedule
        )


# ---- measuring -------------------------------------------------------------------------------
def build_engine(settings: PipelineBenchSettings, stages: int, layers: tuple[int, ...] | None):
    from splitserve.engine.config import EngineConfig
    from splitserve.executors.build import create_engine

    cfg = EngineConfig(
        model=settings.model,
        dtype=settings.dtype,
        num_threads=settings.threads,
        max_num_seqs=settings.batch,
        max_num_batched_tokens=max(512, settings.batch * settings.prompt_tokens),
        enable_prefix_caching=False,
        pipeline_stages=stages,
        pipeline_layers=layers,
    )
    return create_engine(cfg)


def calls_per_step(engine: LLMEngine) -> int:
    """engine.step() calls that give every sequence one token: under the overlap schedule a
    call is one group's step."""
    return max(1, engine.runner.overlap_groups)


def decode_window(engine: LLMEngine, settings: PipelineBenchSettings, tag: str, rng):
    """Prefill a batch and warm up; the caller measures the steps and aborts the requests."""
    from splitserve.engine.sampling_params import SamplingParams

    params = SamplingParams(
        max_tokens=settings.warmup_steps + settings.steps + 4, temperature=0, ignore_eos=True
    )
    vocab = engine.model_config.vocab_size
    ids = [f"{tag}-{i}" for i in range(settings.batch)]
    for rid in ids:
        engine.add_request(rid, list(random_prompt(rng, settings.prompt_tokens, vocab)), params)
    started: set[str] = set()
    while len(started) < len(ids):  # every prompt prefilled: from here on, pure decode steps
        started |= {o.request_id for o in engine.step()}
    for _ in range(settings.warmup_steps * calls_per_step(engine)):
        engine.step()
    return ids


def measure(engine: LLMEngine, settings: PipelineBenchSettings, m: int, schedule: str, rng) -> Run:
    ex = engine.runner.executor
    ex.micro_batches, ex.schedule = m, schedule
    engine.reschedule()
    p = len(ex.ranges)
    ids = decode_window(engine, settings, f"p{p}m{m}{schedule}", rng)
    meter = CpuMeter(lambda: ex.stage_pids)
    tokens0 = engine.stats.num_batched_tokens
    meter.start()
    before, t0 = ex.stage_stats(), time.perf_counter()
    for _ in range(settings.steps * calls_per_step(engine)):
        engine.step()
    wall = time.perf_counter() - t0
    decode_tokens = engine.stats.num_batched_tokens - tokens0
    after = ex.stage_stats()
    share = meter.stop()
    for rid in ids:
        engine.abort_request(rid)
    while engine.has_unfinished_requests():  # collect the aborted steps still in flight
        engine.step()
    return Run(
        stages=p,
        micro_batches=m,
        layers=list(ex.ranges),
        wall_s=wall,
        steps=settings.steps,
        decode_tokens=decode_tokens,
        busy=[(b.busy_s - a.busy_s) / wall for a, b in zip(before, after, strict=True)],
        cpu=[(b.cpu_s - a.cpu_s) / wall for a, b in zip(before, after, strict=True)],
        others_cpu=share.others_fraction,
        schedule=schedule,
    )


def measure_baseline(settings: PipelineBenchSettings, rng) -> float:
    """Decode tokens/s of the same batch without a pipeline: the best of `repeats`."""
    engine = build_engine(settings, 1, None)
    try:
        rates = []
        for i in range(settings.repeats):
            ids = decode_window(engine, settings, f"p1-{i}", rng)
            tokens0, t0 = engine.stats.num_batched_tokens, time.perf_counter()
            for _ in range(settings.steps):
                engine.step()
            rates.append((engine.stats.num_batched_tokens - tokens0) / (time.perf_counter() - t0))
            for rid in ids:
                engine.abort_request(rid)
        return max(rates)
    finally:
        engine.close()


def pin_stages(pids: list[int]) -> list[list[int]]:
    """Stage k (this process for k = 0) on the k-th allowed CPU, modulo their number."""
    cpus = sorted(os.sched_getaffinity(0))
    out = []
    for k, pid in enumerate([os.getpid(), *pids]):
        cpu = cpus[k % len(cpus)]
        pin_process(pid, {cpu})
        out.append([cpu])
    return out


def pilot_layers(settings: PipelineBenchSettings, cfg, p: int, rng, result, say) -> tuple[int, ...]:
    """Measure P stages split by parameters at the largest M, then split by what a layer and
    the head cost there (`measured_costs`)."""
    m, mask = max(settings.micro_batches), os.sched_getaffinity(0)
    engine = build_engine(settings, p, compute_balanced_layers(cfg, p))
    try:
        ex = engine.runner.executor
        if settings.pin:
            pin_stages(ex.stage_pids)
        pilot = replace(settings, steps=max(4, settings.steps // 2))
        run = measure(engine, pilot, m, settings.schedules[0], rng)
    finally:
        engine.close()
        pin_process(os.getpid(), mask)  # pin_stages put this process on one core
    per_layer, head = measured_costs(run)
    layers = split_by_cost(cfg.num_layers, p, per_layer, head)
    pilot = result.pilots[p] = Pilot(run, per_layer, head, layers)
    say(
        f"P={p} pilot (M={m}, layers {','.join(map(str, run.counts))}): "
        f"the LM head costs {pilot.head_layers:.1f} layers -> layers {','.join(map(str, layers))}"
    )
    return layers


def run_bench(settings: PipelineBenchSettings, say=print) -> PipelineBenchResult:
    import torch

    from splitserve.model.loader import open_checkpoint
    from splitserve.services.server import fast_gil_handoff

    cfg = open_checkpoint(settings.model).config
    result = PipelineBenchResult(settings, model=cfg.name)
    given = dict(settings.layers)
    rng = random.Random(settings.seed)
    threads, mask = torch.get_num_threads(), os.sched_getaffinity(0)
    switch_interval = sys.getswitchinterval()
    fast_gil_handoff()  # stage 0 is this process: set it up as a worker is
    try:
        if settings.baseline:
            if settings.pin:
                pin_process(os.getpid(), {min(mask)})
            result.baseline_tokens_per_s = measure_baseline(settings, rng)
            say(f"P=1: {result.baseline_tokens_per_s:.1f} decode tokens/s")
        for p in settings.stages:
            pin_process(os.getpid(), mask)  # children start unpinned, then get their core
            result.loadavg.append(os.getloadavg()[0])
            layers = given.get(p)
            if layers is None:
                layers = pilot_layers(settings, cfg, p, rng, result, say)
            engine = build_engine(settings, p, layers)
            try:
                ex = engine.runner.executor
                result.cores[p] = pin_stages(ex.stage_pids) if settings.pin else []
                for schedule in settings.schedules:
                    for m in settings.micro_batches:
                        tries = [
                            measure(engine, settings, m, schedule, rng)
                            for _ in range(settings.repeats)
                        ]
                        run = min(tries, key=lambda r: r.others_cpu)
                        result.runs.append(run)
                        say(
                            f"P={p} {schedule} M={m}: busy "
                            f"{' '.join(f'{b:.2f}' for b in run.busy)} "
                            f"(ideal {run.ideal:.2f}), {run.step_ms:.0f} ms/step"
                        )
            finally:
                engine.close()
    finally:
        pin_process(os.getpid(), mask)
        torch.set_num_threads(threads)
        sys.setswitchinterval(switch_interval)
    return result


# ---- reporting -------------------------------------------------------------------------------
def report_lines(result: PipelineBenchResult) -> list[str]:
    s = result.settings
    pinned = "pinned, stage k on CPU k mod #CPUs" if s.pin else "not pinned"
    lines = [
        f"pipeline utilization: {result.model}, {s.dtype}, {s.batch} sequences decoding, "
        f"{s.steps} steps measured after {s.warmup_steps} warm-up; {s.threads} torch thread(s) "
        f"per stage, {pinned}; {os.cpu_count()} logical CPUs",
        "busy = wall time inside the stage's forward / wall time of the steps; "
        "cpu = CPU time of those forwards / wall time; ideal: step M/(M+P-1), "
        "overlap min(1, M/P); min/step-ideal: the least busy stage over M/(M+P-1)",
    ]
    width = max(r.stages for r in result.runs)
    header = ["P", "schedule", "M", "layers", "ideal", *(f"stage{k}" for k in range(width))]
    header += ["min/ideal", "min/step-ideal", "cpu", "ms/step", "tok/s", "others"]
    rows = []
    for r in result.runs:
        busy = [f"{b:.2f}" for b in r.busy] + [""] * (width - r.stages)
        rows.append(
            [
                str(r.stages),
                r.schedule,
                str(r.micro_batches),
                ",".join(map(str, r.counts)),
                f"{r.ideal:.2f}",
                *busy,
                f"{min(r.busy_vs_ideal):.2f}",
                f"{min(r.busy_vs_step_ideal):.2f}",
                " ".join(f"{c:.2f}" for c in r.cpu),
                f"{r.step_ms:.0f}",
                f"{r.tokens_per_s:.0f}",
                f"{100 * r.others_cpu:.0f}%",
            ]
        )
    lines += format_table(header, rows)
    for p, pilot in result.pilots.items():
        pr = pilot.run
        lines.append(
            f"P={p} layers from a pilot at M={pr.micro_batches} split by parameters "
            f"({','.join(map(str, pr.counts))}; cpu "
            f"{' '.join(f'{c:.2f}' for c in pr.cpu)}): a layer {pilot.per_layer_cpu:.3f}, "
            f"the LM head {pilot.head_cpu:.3f} = {pilot.head_layers:.1f} layers"
        )
    if result.baseline_tokens_per_s:
        lines.append(f"P=1 (no pipeline), same batch: {result.baseline_tokens_per_s:.0f} tok/s")
    if result.loadavg:
        lines.append(
            "1-min load average before each P: " + ", ".join(f"{x:.1f}" for x in result.loadavg)
        )
    return lines


def result_json(result: PipelineBenchResult) -> dict[str, Any]:
    return {
        "model": result.model,
        "cores": {str(p): c for p, c in result.cores.items()},
        "loadavg_1m": result.loadavg,
        "baseline_tokens_per_s": result.baseline_tokens_per_s,
        "pilots": {
            str(p): {
                "run": asdict(pl.run),
                "per_layer_cpu": pl.per_layer_cpu,
                "head_cpu": pl.head_cpu,
                "head_layers": pl.head_layers,
                "layers": list(pl.layers),
            }
            for p, pl in result.pilots.items()
        },
        "runs": [
            {
                **asdict(r),
                "ideal": r.ideal,
                "busy_vs_ideal": r.busy_vs_ideal,
                "busy_vs_step_ideal": r.busy_vs_step_ideal,
                "step_ms": r.step_ms,
                "tokens_per_s": r.tokens_per_s,
            }
            for r in result.runs
        ],
        FINAL_KEY: result.final_ratio(),
        "final_by_schedule": {sc: result.final_ratio(sc) for sc in result.settings.schedules},
        "target": TARGET,
    }


def write_plot(path: str, result: PipelineBenchResult) -> None:
    """A panel per (schedule, P): each stage's busy (filled) and CPU (hollow) fraction against
    M, with the schedule's ideal and the 15% band under it."""
    ps = sorted({r.stages for r in result.runs})
    schedules = result.settings.schedules

    def draw(fig: Any) -> None:
        axes = fig.subplots(len(schedules), len(ps), squeeze=False)
        for row, schedule in zip(axes, schedules, strict=True):
            for ax, p in zip(row, ps, strict=True):
                _plot_panel(ax, result, schedule, p)

    save_plot(path, (6 * len(ps), 4.5 * len(schedules)), draw)


def _plot_panel(ax: Any, result: PipelineBenchResult, schedule: str, p: int) -> None:
    runs = sorted(
        (r for r in result.runs if r.stages == p and r.schedule == schedule),
        key=lambda r: r.micro_batches,
    )
    ms = [r.micro_batches for r in runs]
    grid = [m / 8 for m in range(8, 8 * max(ms) + 1)]
    best = [ideal(m, p, schedule) for m in grid]
    label = "min(1, M/P)" if schedule == "overlap" else "M/(M+P-1)"
    ax.plot(grid, best, "k--", label=f"ideal {label}")
    if schedule == "overlap":
        step_best = [ideal(m, p) for m in grid]
        ax.plot(grid, step_best, "k:", label="step's ideal M/(M+P-1)")
    ax.fill_between(grid, [TARGET * b for b in best], best, color="0.9", label="within 15%")
    for k in range(p):
        (line,) = ax.plot(ms, [r.busy[k] for r in runs], "o-", label=f"stage {k} busy")
        ax.plot(ms, [r.cpu[k] for r in runs], "o", mfc="none", color=line.get_color())
    layers = ",".join(map(str, runs[0].counts))
    ax.set_xscale("log", base=2)
    ax.set_xticks(ms, [str(m) for m in ms])
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("micro-batches M")
    ax.set_ylabel("fraction of wall time (hollow: CPU time)")
    ax.set_title(f"{schedule} schedule, P={p} stages, layers {layers}")
    ax.legend(fontsize=8, loc="lower right")


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    result = run_bench(settings)
    other_schedules = [
        f"{schedule} schedule: {FINAL_KEY} {result.final_ratio(schedule):.2f}"
        for schedule in settings.schedules[1:]
    ]
    lines = [*report_lines(result), *other_schedules]
    final = report.final_line(FINAL_KEY, result.final_ratio())
    doc = partial(json_document, settings, **result_json(result))
    finish(args, lines, final, doc, partial(write_plot, result=result))
    return 0
