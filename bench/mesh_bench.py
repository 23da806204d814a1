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
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from splitserve.bench.workload import (
    BenchRequest,
    ThroughputResult,
    WorkloadSpec,
    make_workload,
    random_prompt,
    ratio,
)

if TYPE_CHECKING:
    from splitserve.bench.mesh_runner import CpuMeter, CpuShare, RunningMesh, StreamResult

FINAL_KEY = "mesh_throughput_ratio_vs_engine"
MB = 1e6  # transfer rates in MB/s (10^6 bytes), as network rates are quoted
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
TTFT_CASES = ("cold", "warm_store", "warm_local")
CASE_LABELS = {
    "cold": "cold (fresh salt: in no cache)",
    "warm_store": "warm store (kvstore only)",
    "warm_local": "warm local (worker cache)",
}


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


@dataclass(frozen=True)
class SharedPrefixPrompts:
    """Per TTFT case, one prompt per request: the shared system prompt + a distinct suffix.

    Request i of every case uses cache salt `salts[i]`, so the cold request i computes the
    prefix that warm-store request i fetches and warm-local request i finds cached; no other
    request can have warmed it (salts are fresh per run).
    """

    system: tuple[int, ...]
    prompts: dict[str, list[tuple[int, ...]]]
    salts: list[str]


def shared_prefix_prompts(
    settings: MeshBenchSettings, vocab_size: int, seed: int, nonce: str
) -> SharedPrefixPrompts:
    rng = random.Random(seed + 1000)
    system = random_prompt(rng, settings.system_prompt_tokens, vocab_size)
    prompts = {
        case: [
            system + random_prompt(rng, settings.suffix_tokens, vocab_size)
            for _ in range(settings.ttft_requests)
        ]
        for case in TTFT_CASES
    }
    salts = [f"mesh-bench-{nonce}-{i}" for i in range(settings.ttft_requests)]
    return SharedPrefixPrompts(system, prompts, salts)


# ---- results ---------------------------------------------------------------------------------
@dataclass
class LatencyStats:
    n: int
    mean: float
    median: float
    min: float
    max: float

    @classmethod
    def of(cls, xs: Sequence[float]) -> LatencyStats:
        if not xs:
            return cls(0, 0.0, 0.0, 0.0, 0.0)
        return cls(len(xs), statistics.fmean(xs), statistics.median(xs), min(xs), max(xs))


def reduction(warm: float, cold: float) -> float:
    """How much lower `warm` is than `cold`: 0.8 = 80% lower; 0 when cold wasn't measured."""
    return 1.0 - warm / cold if cold > 0 else 0.0


@dataclass
class TransferStats:
    """KV pulled by the decode worker over one phase: metric deltas."""

    transfers: int = 0
    bytes: float = 0.0
    seconds: float = 0.0  # summed PullKV + reassembly time

    @property
    def mb_per_s(self) -> float:
        return self.bytes / MB / self.seconds if self.seconds > 0 else 0.0

    @property
    def mean_seconds(self) -> float:
        return self.seconds / self.transfers if self.transfers else 0.0

    @property
    def mean_mb(self) -> float:
        return self.bytes / MB / self.transfers if self.transfers else 0.0


def transfer_delta(before: dict, after: dict) -> TransferStats:
    """From two scrapes of the decode worker's /metrics."""
    from splitserve.bench.mesh_runner import sample

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    return TransferStats(
        transfers=round(delta("splitserve_worker_kv_transfer_seconds_count")),
        bytes=delta("splitserve_worker_kv_transfer_bytes_total", direction="received"),
        seconds=delta("splitserve_worker_kv_transfer_seconds_sum"),
    )


@dataclass
class TTFTCase:
    name: str
    ttfts: list[float]
    prompt_tokens: list[int]
    cached_tokens: list[int]  # usage.cached_prompt_tokens: local + kvstore hits at prefill
    store_blocks_before: list[int]  # prefix blocks in the kvstore just before each request
    store_blocks_fetched: int  # the prefill worker's kvstore_blocks_fetched_total delta
    transfer: TransferStats

    @property
    def stats(self) -> LatencyStats:
        return LatencyStats.of(self.ttfts)

    @property
    def transfer_share(self) -> float:
        """Mean KV transfer time / mean TTFT: the transfer is on the first token's path."""
        return ratio(self.transfer.mean_seconds, self.stats.mean)


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
        cold = getattr(self.ttft["cold"].stats, stat)
        return reduction(getattr(self.ttft[case].stats, stat), cold)


def count_same(ours: dict[str, list[int]], engine: dict[str, list[int]]) -> int:
    return sum(1 for rid, toks in engine.items() if ours.get(rid) == toks)


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
    from splitserve.engine.engine import LLMEngine
    from splitserve.executors.flags import engine_config

    with phases(PHASES[0]):
        engine = LLMEngine.from_config(engine_config(args), checkpoint)
        warm_up_engine(engine, engine.model_config.vocab_size)
    prompts = [r.prompt_token_ids for r in requests]
    params = [exact_greedy(r.output_len) for r in requests]
    expected = sum(r.output_len for r in requests)
    runs: list[ThroughputResult] = []
    tokens: dict[str, list[int]] = {}
    with phases(PHASES[1]):
        for _ in range(repeats):
            engine.block_manager.reset_prefix_cache()
            start = time.perf_counter()
            outs = engine.generate(prompts, params)
            seconds = time.perf_counter() - start
            generated = sum(len(o.new_token_ids) for o in outs)
            if generated != expected:
                raise RuntimeError(f"the engine generated {generated} tokens, not {expected}")
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
def _channel(mesh: RunningMesh, name: str) -> Any:
    """The router with the mesh's API key, the kvstore with its client certificate."""
    return mesh.channel(name)


async def _warm_up(
    mesh: RunningMesh, router: str, settings: MeshBenchSettings, vocab: int, tag: str, disagg: bool
):
    """One short request: the router sees its workers, the workers' kernels are loaded."""
    from splitserve.bench.mesh_runner import generate_request, wait_until_served
    from splitserve.v1 import rpc

    prompt = random_prompt(random.Random(tag), settings.warmup_prompt_tokens, vocab)
    req = generate_request(
        f"warmup-{tag}",
        prompt,
        settings.warmup_output_tokens,
        cache_salt=f"warmup-{tag}",
        disaggregate=True if disagg else None,
    )
    async with _channel(mesh, router) as channel:
        await wait_until_served(rpc.InferenceStub(channel), req)


async def run_mesh_workload(
    mesh: RunningMesh,
    router: str,
    requests: list[BenchRequest],
    tag: str,
    repeats: int = 1,
    disaggregate: bool | None = None,
) -> tuple[list[ThroughputResult], dict[str, list[int]]]:
    """Every request at once, each its own Generate stream, timed from the first send to the
    last token; `repeats` times, each under its own cache salt (a repeat must not find the
    previous run's prompts in the worker's prefix cache). Tokens are the first run's."""
    from splitserve.bench.mesh_runner import generate_request, stream_generate
    from splitserve.v1 import rpc

    expected = sum(r.output_len for r in requests)
    runs: list[ThroughputResult] = []
    tokens: dict[str, list[int]] = {}
    async with _channel(mesh, router) as channel:
        stub = rpc.InferenceStub(channel)
        for k in range(repeats):
            reqs = [
                generate_request(f"{tag}-{k}-{r.request_id}", r.prompt_token_ids, r.output_len,
                                 cache_salt=f"{tag}-{k}", disaggregate=disaggregate)
                for r in requests
            ]  # fmt: skip
            start = time.perf_counter()
            results = await asyncio.gather(*(stream_generate(stub, q) for q in reqs))
            seconds = max(r.done for r in results) - start
            generated = sum(len(r.token_ids) for r in results)
            if generated != expected:
                raise RuntimeError(f"the mesh ({tag}) generated {generated} tokens, not {expected}")
            runs.append(ThroughputResult(generated, seconds))
            tokens = tokens or {
                r.request_id: res.token_ids for r, res in zip(requests, results, strict=True)
            }
    return runs, tokens


async def _ttft_case(
    case: str,
    mesh: RunningMesh,
    router: str,
    prompts: SharedPrefixPrompts,
    keys: ChainKeys,
    settings: MeshBenchSettings,
) -> TTFTCase:
    """One request at a time, each after the previous one's kvstore write-back has landed (the
    cold case's is what the warm-store case needs; waiting also keeps the machine quiet)."""
    from splitserve.bench.mesh_runner import (
        generate_request,
        sample,
        scrape_metrics,
        store_match,
        stream_generate,
        wait_stored,
    )
    from splitserve.v1 import rpc

    fetched_name = "splitserve_worker_kvstore_blocks_fetched_total"
    prefill = "prefill-0" if router == "router-cold" else "prefill-1"
    before_d = scrape_metrics(mesh.metrics_url("decode-0"))
    before_p = scrape_metrics(mesh.metrics_url(prefill))
    results: list[StreamResult] = []
    stored_before: list[int] = []
    async with _channel(mesh, router) as ch, _channel(mesh, "kvstore") as kv_ch:
        stub, store = rpc.InferenceStub(ch), rpc.KVStoreStub(kv_ch)
        for i, prompt in enumerate(prompts.prompts[case]):
            stored_before.append(await store_match(store, keys.prefix[i]))
            req = generate_request(
                f"ttft-{case}-{i}",
                prompt,
                settings.ttft_output_tokens,
                cache_salt=prompts.salts[i],
                disaggregate=True,
            )
            results.append(await stream_generate(stub, req))
            await wait_stored(store, keys.prompts[case][i])
    after_d = scrape_metrics(mesh.metrics_url("decode-0"))
    after_p = scrape_metrics(mesh.metrics_url(prefill))
    return TTFTCase(
        case,
        [r.ttft for r in results],
        [len(p) for p in prompts.prompts[case]],
        [r.cached_prompt_tokens for r in results],
        stored_before,
        round(sample(after_p, fetched_name) - sample(before_p, fetched_name)),
        transfer_delta(before_d, after_d),
    )


@dataclass
class ChainKeys:
    """The kvstore keys (hash chains of full blocks) the TTFT requests produce."""

    prefix: list[list[bytes]]  # per request: the shared system prompt under its salt
    prompts: dict[str, list[list[bytes]]]  # per case and request: the whole prompt

    @classmethod
    def of(cls, prompts: SharedPrefixPrompts, namespace: bytes, block_size: int) -> ChainKeys:
        from splitserve.engine.hashing import block_hashes

        def chain(tokens: Sequence[int], salt: str) -> list[bytes]:
            return block_hashes(tokens, block_size, namespace, salt)

        return cls(
            [chain(prompts.system, salt) for salt in prompts.salts],
            {
                case: [chain(p, salt) for p, salt in zip(ps, prompts.salts, strict=True)]
                for case, ps in prompts.prompts.items()
            },
        )


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
    from splitserve.bench.mesh_runner import scrape_metrics

    bench.prefix_blocks = len(keys.prefix[0])
    # Cold through router-cold (prefill-0); both warm cases through `router` (prefill-1).
    for case, router, phase in (
        ("cold", "router-cold", PHASES[6]),
        ("warm_store", "router", PHASES[7]),
        ("warm_local", "router", PHASES[8]),
    ):
        with phases(phase):
            bench.ttft[case] = await _ttft_case(case, mesh, router, prompts, keys, bench.settings)
            mesh.check_alive()
    with phases(PHASES[9]):
        decode_metrics = mesh.metrics_url("decode-0")
        before = scrape_metrics(decode_metrics)
        runs, tokens = await run_mesh_workload(
            mesh, "router", bench.workload, "disagg", disaggregate=True
        )
        bench.workload_transfer = transfer_delta(before, scrape_metrics(decode_metrics))
        mesh.check_alive()
    bench.disagg = ThroughputRun.best_of("mesh, disaggregated", runs)
    return tokens


# ---- the run ---------------------------------------------------------------------------------
class Phases:
    """A progress bar over the benchmark's phases; remembers how long each took, the load
    average when it started, and how much CPU time other processes took during it (`pids`:
    the running mesh's processes, which are ours)."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=total, desc="bench mesh", unit="phase", leave=False, disable=not enabled
        )
        self.seconds: dict[str, float] = {}
        self.loadavg: dict[str, float] = {}
        self.cpu: dict[str, CpuShare] = {}
        self.pids: Callable[[], list[int]] = list
        self._open: dict[str, tuple[float, CpuMeter | None]] = {}

    def to_json(self) -> dict:
        """Per phase: seconds, the 1-minute load average at its start, CPU shares."""
        return {
            "phase_seconds": self.seconds,
            "phase_loadavg_1m": self.loadavg,
            "phase_cpu": {
                name: {**asdict(c), "others_fraction": c.others_fraction}
                for name, c in self.cpu.items()
            },
        }

    def begin(self, name: str) -> None:
        from splitserve.bench.mesh_runner import CpuMeter

        self.bar.set_postfix_str(name)
        self.loadavg[name] = os.getloadavg()[0]
        meter: CpuMeter | None
        try:
            meter = CpuMeter(lambda: self.pids())
            meter.start()
        except OSError:  # no /proc: not Linux
            meter = None
        self._open[name] = (time.perf_counter(), meter)

    def done(self, name: str) -> None:
        start, meter = self._open.pop(name)
        self.seconds[name] = time.perf_counter() - start
        if meter is not None:
            self.cpu[name] = meter.stop()
        self.bar.update()

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.begin(name)
        yield
        self.done(name)

    def close(self) -> None:
        self.bar.close()


def run(args: argparse.Namespace) -> int:
    import grpc

    from splitserve.bench import BenchError
    from splitserve.bench.mesh_runner import MeshError

    try:
        return _run(args)
    except grpc.aio.AioRpcError as exc:
        hint = f" (services' logs in {args.log_dir})" if args.log_dir else " (rerun with --log-dir)"
        message = f"a request to the mesh failed: {exc.code().name}: {exc.details()}{hint}"
        raise BenchError(message) from None
    except MeshError as exc:
        import sys

        print(str(exc), file=sys.stderr)
        hint = "" if args.log_dir else "; rerun with --log-dir DIR to keep every service's log"
        raise BenchError(str(exc).splitlines()[0] + hint) from None


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
    from splitserve.bench import mesh_runner as mr
    from splitserve.engine.hashing import kv_namespace
    from splitserve.launcher.topology import engine_argv
    from splitserve.model.loader import open_checkpoint

    settings = _settings(args)
    ckpt = open_checkpoint(args.model)
    vocab, model = ckpt.config.vocab_size, ckpt.config.name
    requests = bench_workload(settings, vocab)
    prompts = shared_prefix_prompts(settings, vocab, args.seed, uuid.uuid4().hex[:8])
    flags = engine_argv(args)  # what every worker gets: the baseline's exact engine flags
    bench = MeshBenchResult(model, settings, {}, requests)
    phases = Phases(len(PHASES))
    with ExitStack() as cleanup:
        logs = args.log_dir or cleanup.enter_context(tempfile.TemporaryDirectory(prefix="mesh-"))

        # (a) The baseline first, alone: its engine is freed before any mesh process starts.
        bench.engine, engine_tokens, bench.engine_settings = run_engine_baseline(
            args, ckpt, requests, settings.repeats, phases
        )
        e = bench.engine_settings

        with ExitStack() as stack:
            with phases(PHASES[2]):
                topology = mr.colocated_topology(flags)
                path = os.path.join(logs, "colocated")
                mesh = stack.enter_context(
                    mr.running_mesh(topology, path, settings.startup_timeout_s)
                )
                bench.startup_seconds["colocated"] = mesh.started_s
                phases.pids = mesh.pids
                asyncio.run(_warm_up(mesh, "router", settings, vocab, "colo", False))
            with phases(PHASES[3]):
                repeats = settings.repeats
                workload = run_mesh_workload(mesh, "router", requests, "colocated", repeats)
                runs, tokens = asyncio.run(workload)
                mesh.check_alive()
            bench.colocated = ThroughputRun.best_of("mesh, colocated", runs)
            bench.colocated.same_tokens = count_same(tokens, engine_tokens)
            phases.begin(PHASES[4])
        phases.done(PHASES[4])

        with ExitStack() as stack:
            with phases(PHASES[5]):
                topology = mr.disagg_topology(flags)
                path = os.path.join(logs, "disaggregated")
                mesh = stack.enter_context(
                    mr.running_mesh(topology, path, settings.startup_timeout_s)
                )
                bench.startup_seconds["disaggregated"] = mesh.started_s
                phases.pids = mesh.pids
                asyncio.run(warm_up_disagg(mesh, settings, vocab))
            namespace = kv_namespace(model, e["dtype"], e["block_size"])
            keys = ChainKeys.of(prompts, namespace, e["block_size"])
            tokens = asyncio.run(run_disagg_session(mesh, bench, prompts, keys, phases))
            assert bench.disagg is not None
            bench.disagg.same_tokens = count_same(tokens, engine_tokens)
            phases.begin(PHASES[10])
        phases.done(PHASES[10])
    phases.close()
    bench.loadavg = phases.loadavg
    bench.cpu = phases.cpu

    print("\n".join(report_lines(bench)))
    if args.json:
        write_json(args.json, bench, phases)
    if args.plot:
        write_plot(args.plot, bench)
    print(final_line(bench))
    return 0


# ---- report ----------------------------------------------------------------------------------
def final_line(bench: MeshBenchResult) -> str:
    return f"{FINAL_KEY}: {bench.colocated_ratio:.2f}"


def format_table(header: list[str], rows: list[list[str]]) -> list[str]:
    from splitserve.bench.engine_bench import format_table as fmt

    return fmt(header, rows)


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:,.0f}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _others(bench: MeshBenchResult, phase: str) -> str:
    """CPU time other processes took during a phase, as a share of the machine's capacity."""
    share = bench.cpu.get(phase)
    return "-" if share is None else _pct(share.others_fraction)


def _load_note(loadavg: dict[str, float], cpus: int | None) -> str:
    """Another process busy on the machine shows as load at a phase's start beyond ours."""
    if not loadavg:
        return ""
    lo, hi = min(loadavg.values()), max(loadavg.values())
    note = f"; 1-min load average at phase starts {lo:.1f}-{hi:.1f}"
    first = next(iter(loadavg.values()))
    if cpus and first > 0.5 * cpus:
        note += " (busy before the run started: expect noise)"
    return note


def workload_line(bench: MeshBenchResult) -> str:
    s, reqs = bench.settings, bench.workload
    w = s.workload
    scaled = ""
    if (s.prompt_scale, s.output_scale) != (1.0, 1.0):
        scaled = f" with prompts x{s.prompt_scale:g} and outputs x{s.output_scale:g}"
    return (
        f"workload: {len(reqs)} concurrent requests, prompts {min(r.prompt_len for r in reqs)}-"
        f"{max(r.prompt_len for r in reqs)} tokens ({sum(r.prompt_len for r in reqs)} total), "
        f"outputs {min(r.output_len for r in reqs)}-{max(r.output_len for r in reqs)} tokens "
        f"({sum(r.output_len for r in reqs)} total): bench/workload.py seed {w.seed}{scaled}; "
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


def ttft_table(bench: MeshBenchResult) -> list[str]:
    cold = bench.ttft["cold"].stats
    rows = []
    for case in TTFT_CASES:
        c = bench.ttft.get(case)
        if c is None:
            continue
        st = c.stats
        rows.append([
            CASE_LABELS[case], _ms(st.mean), _ms(st.median), _ms(st.min), _ms(st.max),
            f"{statistics.fmean(c.cached_tokens):.0f}/{statistics.fmean(c.prompt_tokens):.0f}",
            str(c.store_blocks_fetched),
            "-" if case == "cold" else _pct(reduction(st.mean, cold.mean)),
            "-" if case == "cold" else _pct(reduction(st.median, cold.median)),
        ])  # fmt: skip
    header = "(b) TTFT|mean ms|median ms|min ms|max ms|cached/prompt|store blocks fetched|" \
        "lower (mean)|lower (median)"  # fmt: skip
    return format_table(header.split("|"), rows)


def transfer_table(bench: MeshBenchResult) -> list[str]:
    rows = []
    for case in TTFT_CASES:
        c = bench.ttft.get(case)
        if c is None:
            continue
        t = c.transfer
        rows.append([
            CASE_LABELS[case], str(t.transfers), f"{t.mean_mb:.1f}", _ms(t.mean_seconds),
            f"{t.mb_per_s:,.0f}", _ms(c.stats.mean), _pct(c.transfer_share),
        ])  # fmt: skip
    if bench.workload_transfer is not None:
        t = bench.workload_transfer
        rows.append([
            f"{len(bench.workload)}-request workload (concurrent)", str(t.transfers),
            f"{t.mean_mb:.1f}", _ms(t.mean_seconds), f"{t.mb_per_s:,.0f}", "-", "-",
        ])  # fmt: skip
    header = "(c) KV transfer prefill->decode|transfers|MB each|ms each|MB/s|TTFT ms|share of TTFT"
    return format_table(header.split("|"), rows)


def report_lines(bench: MeshBenchResult) -> list[str]:
    from splitserve.bench.engine_bench import machine_info

    e, s, m = bench.engine_settings, bench.settings, machine_info()
    lines = [
        f"mesh benchmark: {bench.model}, {e.get('dtype')}; engine everywhere: block "
        f"{e.get('block_size')}, KV pool {e.get('kv_blocks')} blocks "
        f"({e.get('kv_pool_bytes', 0) / 2**20:,.0f} MiB), max_num_seqs {e.get('max_num_seqs')}, "
        f"max_num_batched_tokens {e.get('max_num_batched_tokens')}, torch threads "
        f"{e.get('torch_threads')}",
        f"machine: {m['cpu']}, {m['logical_cpus']} CPUs shared by every process of the run"
        + _load_note(bench.loadavg, m["logical_cpus"]),
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
            *ttft_table(bench),
            "CPU taken by other processes during the TTFT phases: "
            + ", ".join(
                f"{case.replace('_', ' ')} {_others(bench, phase)}"
                for case, phase in zip(TTFT_CASES, PHASES[6:9], strict=True)
            ),
            "",
            *transfer_table(bench),
            "",
            f"ttft_warm_store_reduction: {_pct(bench.ttft_reduction('warm_store'))} (mean), "
            f"{_pct(bench.ttft_reduction('warm_store', 'median'))} (median)",
        ]
        if bench.workload_transfer is not None:
            lines.append(f"kv_transfer_mb_per_s: {_transfer_rate(bench):.0f}")
    lines.append(f"mesh_disaggregated_ratio_vs_engine: {bench.disagg_ratio:.2f}")
    return lines


def _transfer_rate(bench: MeshBenchResult) -> float:
    """Over every sequential (TTFT) transfer: total bytes / total time."""
    ts = [c.transfer for c in bench.ttft.values()]
    total = TransferStats(
        sum(t.transfers for t in ts), sum(t.bytes for t in ts), sum(t.seconds for t in ts)
    )
    return total.mb_per_s


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

    def transfer_json(t: TransferStats | None) -> dict[str, Any] | None:
        if t is None:
            return None
        return {
            **asdict(t),
            "mb_per_s": t.mb_per_s,
            "mean_seconds": t.mean_seconds,
            "mean_mb": t.mean_mb,
        }

    ttft = {}
    for case, c in bench.ttft.items():
        ttft[case] = {
            "ttft_seconds": c.ttfts,
            "stats": asdict(c.stats),
            "prompt_tokens": c.prompt_tokens,
            "cached_prompt_tokens": c.cached_tokens,
            "store_prefix_blocks_before": c.store_blocks_before,
            "store_blocks_fetched": c.store_blocks_fetched,
            "transfer": transfer_json(c.transfer),
            "transfer_share_of_ttft": c.transfer_share,
        }
        if case != "cold":
            ttft[case]["reduction_vs_cold_mean"] = bench.ttft_reduction(case, "mean")
            ttft[case]["reduction_vs_cold_median"] = bench.ttft_reduction(case, "median")
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
        "ttft": ttft,
        "prefix_blocks": bench.prefix_blocks,
        "kv_transfer_workload": transfer_json(bench.workload_transfer),
        "kv_transfer_mb_per_s": _transfer_rate(bench) if bench.ttft else None,
        "mesh_startup_seconds": bench.startup_seconds,
        FINAL_KEY: bench.colocated_ratio,
    }


def write_json(path: str, bench: MeshBenchResult, phases: Phases) -> None:
    import json

    from splitserve.bench.engine_bench import machine_info

    doc = {
        "settings": asdict(bench.settings),
        "machine": machine_info(),
        **phases.to_json(),
        **result_json(bench),
    }
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")


def write_plot(path: str, bench: MeshBenchResult) -> None:
    """(a) tok/s per setup, (b) TTFT per case (mean bars, median dots), (c) TTFT split into
    KV transfer and the rest, with the transfer rate."""
    from matplotlib.figure import Figure

    assert bench.engine
    fig = Figure(figsize=(15, 4.5), layout="constrained")
    ax_a, ax_b, ax_c = fig.subplots(1, 3)

    runs = [r for r in (bench.engine, bench.colocated, bench.disagg) if r is not None]
    labels = ["in-process\nengine", "mesh\ncolocated", "mesh\ndisaggregated"][: len(runs)]
    ax_a.bar(
        labels,
        [r.tokens_per_s for r in runs],
        color=["tab:gray", "tab:blue", "tab:orange"][: len(runs)],
    )
    for x, r in enumerate(runs):
        ax_a.annotate(
            f"{ratio(r.tokens_per_s, bench.engine.tokens_per_s):.2f}x",
            (x, r.tokens_per_s),
            ha="center",
            va="bottom",
        )
    ax_a.set_ylim(0, 1.2 * max(r.tokens_per_s for r in runs))
    ax_a.set_ylabel("generated tokens/s")
    ax_a.set_title(f"(a) throughput, {len(bench.workload)} concurrent requests")

    cases = [c for c in TTFT_CASES if c in bench.ttft]
    names = ["cold", "warm\nstore", "warm\nlocal"][: len(cases)]
    means = [1000 * bench.ttft[c].stats.mean for c in cases]
    medians = [1000 * bench.ttft[c].stats.median for c in cases]
    ax_b.bar(names, means, color=["tab:red", "tab:green", "tab:olive"][: len(cases)], label="mean")
    ax_b.plot(names, medians, "ko", label="median")
    for x, c in enumerate(cases):
        text = "" if c == "cold" else f"-{100 * bench.ttft_reduction(c):.0f}%"
        ax_b.annotate(text, (x, means[x]), ha="center", va="bottom")
    ax_b.set_ylim(0, 1.25 * max(means + medians))
    ax_b.set_ylabel("time to first token, ms")
    ax_b.set_title(f"(b) TTFT, {bench.settings.system_prompt_tokens}-token shared prefix")
    ax_b.legend()

    transfer = [1000 * bench.ttft[c].transfer.mean_seconds for c in cases]
    rest = [max(0.0, m - t) for m, t in zip(means, transfer, strict=True)]
    ax_c.bar(names, transfer, color="tab:purple", label="KV transfer (decode metrics)")
    ax_c.bar(names, rest, bottom=transfer, color="lightgray", label="rest of TTFT")
    for x, c in enumerate(cases):
        t = bench.ttft[c].transfer
        ax_c.annotate(
            f"{t.mb_per_s:,.0f} MB/s\n{100 * bench.ttft[c].transfer_share:.0f}%",
            (x, means[x]),
            ha="center",
            va="bottom",
        )
    ax_c.set_ylim(0, 1.35 * max(means))
    ax_c.set_ylabel("ms")
    ax_c.set_title("(c) KV transfer prefill->decode, share of TTFT")
    ax_c.legend()
    fig.savefig(path, dpi=120)
