"""Meshes for the benchmarks that start one (mesh, dp, faults): built from `splitserve up`'s own
flags and Topology, run under the launcher's process supervision (launcher/supervisor.py), and
talked to as a client would.

    colocated_topology(engine_flags, replicas)  router + N colocated workers, kvstore off
    disagg_topology(engine_flags)           kvstore + prefill-0 + prefill-1 + decode-0 and two
                                            routers: `router` (prefill-1, decode-0) and
                                            `router-cold` (prefill-0, decode-0)
    with bench_errors(log_dir), running_mesh(topology, log_dir) as mesh:
        await warm_up(mesh, "router", prompts, num_tokens, tag)
        runs, tokens = await run_workload(mesh, "router", requests, tag, repeats)
        await stream_generate(stub, request)    # first-token and last-token times at the client
        scrape_metrics(mesh.metrics_url("decode-0"))

Every service logs to LOG_DIR/<name>.log; a startup failure raises MeshError with the tails.
Each mesh is secured as `splitserve up` secures it (mutual TLS inside, an API key at the
routers), its secrets in a private temporary directory removed with it; `mesh.channel(name)`
dials a router with the key, any other service with the launcher's client certificate.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from typing import IO, TYPE_CHECKING, Any

import grpc

from splitserve.bench.workload import BenchRequest, ThroughputResult, check_generated
from splitserve.launcher.supervisor import Console, Mesh, StartupError
from splitserve.launcher.topology import METRICS_PORT, ServiceSpec, Topology
from splitserve.services.security import TLSConfig, open_channel

if TYPE_CHECKING:
    from splitserve.bench.phases import Phases
    from splitserve.v1 import pb

HOST = "127.0.0.1"
STOP_GRACE_S = 15.0  # idle workers exit at once; this only bounds a stuck one
# `--port-offset` values a bench mesh may take: its ports are fixed bases (9100 and up, 50051 and
# up) plus the offset, so the highest (pipeline stages, 50200 and up) stays below 65536.
PORT_OFFSETS = range(1000, 15000)
PORT_OFFSET_STEP = 300  # wider than either cluster of bases in any plan a bench starts
# "START-STOP": the offsets this process's meshes keep to (pytest gives each xdist worker a band
# of its own, so two benchmarks started at once by two test processes never plan one port).
PORT_OFFSETS_ENV = "SPLITSERVE_BENCH_PORT_OFFSETS"
# The routers' ports, per plan: inside the plan's step, past the worker metrics ports (9100 +
# one per worker), so below Linux's ephemeral range (32768 and up). A port the OS picks as free
# is one it may hand to an outgoing connection before the router binds it: these it never does.
ROUTER_PORTS_AT = METRICS_PORT + 200
# No proxy may see loopback traffic; large KV never crosses this client, token streams only.
CLIENT_CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]


class MeshError(RuntimeError):
    """A mesh would not start (or a request to it failed in a way the bench can't use)."""


# ---- topologies --------------------------------------------------------------------------------
def up_args(engine_flags: Sequence[str], *extra: str) -> argparse.Namespace:
    """`splitserve up`'s parsed flags: the mesh gets exactly the engine flags the baseline got."""
    from splitserve.launcher.up import build_parser

    return build_parser().parse_args([*extra, *engine_flags, "--log-level", "warning"])


def _all_ports_free(topology: Topology) -> bool:
    from splitserve.launcher import LaunchError
    from splitserve.launcher.up import check_ports_free

    try:
        check_ports_free(topology)
    except LaunchError:
        return False
    return True


def port_offsets() -> range:
    """The offsets this process may plan a mesh at: $SPLITSERVE_BENCH_PORT_OFFSETS or all."""
    band = os.environ.get(PORT_OFFSETS_ENV)
    if not band:
        return PORT_OFFSETS
    start, _, stop = band.partition("-")
    return range(int(start), int(stop))


def place(build: Callable[[int], Topology], tries: int = 50) -> Topology:
    """A port offset at which every port the topology plans is free right now.

    Offsets are tried in a random order: two benchmarks started at the same moment must not
    both find the same first plan free and then race each other to bind it."""
    band = port_offsets()
    candidates = list(range(band.start, band.stop, PORT_OFFSET_STEP))
    random.shuffle(candidates)
    for offset in candidates[:tries]:
        topology = build(offset)
        if _all_ports_free(topology):
            return topology
    raise MeshError("no free set of ports for the benchmark's mesh; is another one running?")


def strip_flag(args: Sequence[str], flag: str, value: str | None = None) -> list[str]:
    """`args` without `flag VALUE` pairs (only the pair with `value`, when given)."""
    out: list[str] = []
    i = 0
    while i < len(args):
        if args[i] == flag and i + 1 < len(args) and value in (None, args[i + 1]):
            i += 2
            continue
        out.append(args[i])
        i += 1
    return out


def set_flag(args: Sequence[str], flag: str, value: str) -> list[str]:
    out = list(args)
    out[out.index(flag) + 1] = value
    return out


def secrets_dir() -> str:
    """A new private directory's path for a mesh's secrets: `running_mesh` creates it (0700)
    and removes it at the end."""
    return os.path.join(tempfile.gettempdir(), f"splitserve-bench-{uuid.uuid4().hex}")


def local_topology(args: argparse.Namespace, secrets: str) -> Topology:
    """`up`'s topology for these flags, its secrets in `secrets`."""
    from splitserve.launcher.up import local_topology as up_topology

    return up_topology(args, secrets)


def without_kvstore(topology: Topology) -> Topology:
    """The same mesh with no kvstore: workers keep only their local prefix cache."""
    services = [
        replace(
            s,
            args=strip_flag(s.args, "--kvstore"),
            depends_on=[d for d in s.depends_on if d != "kvstore"],
        )
        for s in topology.services
        if s.name != "kvstore"
    ]
    return replace(topology, services=services)


def router_ports(offset: int, n: int) -> list[int]:
    """`n` router ports of the plan at `offset` (checked free with the rest by `place`)."""
    return [ROUTER_PORTS_AT + offset + i for i in range(n)]


def colocated_topology(engine_flags: Sequence[str], replicas: int = 1) -> Topology:
    """Router + `replicas` colocated workers, no kvstore: with one, a single engine process
    does all the work; with more, the router spreads requests over data-parallel replicas."""
    secrets = secrets_dir()

    def build(offset: int) -> Topology:
        grpc_port, http_port = router_ports(offset, 2)
        args = up_args(
            engine_flags,
            *("--colocated", "--decode", str(replicas), "--port-offset", str(offset)),
            *("--grpc-port", str(grpc_port), "--http-port", str(http_port)),
        )
        return without_kvstore(local_topology(args, secrets))

    return place(build)


def _route_only(router: ServiceSpec, drop: ServiceSpec, topology: Topology) -> ServiceSpec:
    address = topology.placement.address(drop.name, drop.ports["grpc"])
    return replace(
        router,
        args=strip_flag(router.args, "--prefill", address),
        depends_on=[d for d in router.depends_on if d != drop.name],
    )


def split_routers(
    topology: Topology, cold_grpc: int, cold_http: int, cold_internal: int
) -> Topology:
    """Two routers over one decode worker and kvstore, each with a prefill worker of its own:
    `router` sends prompts to prefill-1 only, `router-cold` to prefill-0 only. A prefix
    computed through router-cold reaches prefill-1 only by way of the kvstore. (The two share
    the router's certificate and API key file.)"""
    router = topology.router
    prefill = [w for w in topology.workers if w.name.startswith("prefill-")]
    if len(prefill) != 2:
        raise ValueError("split_routers needs exactly two prefill workers")
    main = _route_only(router, prefill[0], topology)
    cold = _route_only(router, prefill[1], topology)
    cold = replace(
        cold,
        name="router-cold",
        args=set_flag(
            set_flag(
                set_flag(cold.args, "--grpc-port", str(cold_grpc)), "--http-port", str(cold_http)
            ),
            "--internal-port",
            str(cold_internal),
        ),
        ports={"grpc": cold_grpc, "http": cold_http, "internal": cold_internal},
    )
    services = [s for s in topology.services if s.name != "router"] + [main, cold]
    return replace(topology, services=services)


def disagg_topology(engine_flags: Sequence[str]) -> Topology:
    """kvstore (in memory), prefill-0, prefill-1, decode-0, `router` and `router-cold`."""
    secrets = secrets_dir()

    def build(offset: int) -> Topology:
        ports = router_ports(offset, 5)
        args = up_args(
            engine_flags,
            *("--prefill", "2", "--decode", "1", "--port-offset", str(offset)),
            # Each router must keep to its own prefill worker: none may join `router` by itself.
            "--no-register",
            *("--grpc-port", str(ports[0]), "--http-port", str(ports[1])),
        )
        return split_routers(local_topology(args, secrets), *ports[2:])

    return place(build)


# ---- running one ------------------------------------------------------------------------------
class QuietConsole(Console):
    """Children's logs to LOG_DIR/<name>.log, the launcher's own lines to LOG_DIR/launcher.log:
    nothing on the terminal but the benchmark's progress bar and tables."""

    def __init__(self, names: list[str], log_dir: str) -> None:
        super().__init__(names, log_dir)
        path = os.path.join(log_dir, "launcher.log")
        self._own: IO[str] = open(path, "a", buffering=1)  # noqa: SIM115 - closed by close()
        self.files.append(self._own)

    def say(self, text: str, stream: IO[str] | None = None) -> None:
        with self.lock:
            self._own.write(text + "\n")


@dataclass
class RunningMesh:
    topology: Topology
    mesh: Mesh
    log_dir: str
    started_s: float = 0.0  # launch to every service SERVING
    api_key: str | None = None  # what the routers ask clients for
    tls: TLSConfig | None = None  # the launcher's client certificate

    def address(self, name: str) -> str:
        return f"{HOST}:{self.topology.service(name).ports['grpc']}"

    def channel(self, name: str) -> grpc.aio.Channel:
        """A grpc.aio channel: to a router's public port with the API key, to any other
        service with the client certificate."""

        if self.topology.service(name).module != "splitserve.router":
            return open_channel(self.address(name), self.tls, CLIENT_CHANNEL_OPTIONS)
        interceptors = api_key_interceptors(self.api_key) if self.api_key else []
        return grpc.aio.insecure_channel(
            self.address(name), options=CLIENT_CHANNEL_OPTIONS, interceptors=interceptors
        )

    def metrics_url(self, name: str) -> str:
        return f"http://{HOST}:{self.topology.service(name).ports['metrics']}/metrics"

    def pids(self) -> list[int]:
        return [c.proc.pid for c in self.mesh.children.values() if c.proc.poll() is None]

    def check_alive(self) -> None:
        dead = self.mesh.first_exited()
        if dead is not None:
            tail = "\n".join(self.mesh.tails([dead.name]))
            raise MeshError(f"{dead.name} exited with status {dead.proc.returncode}\n{tail}")


@contextmanager
def running_mesh(topology: Topology, log_dir: str, timeout: float = 300.0) -> Iterator[RunningMesh]:
    """Start every service (dependencies first), yield once all are SERVING, stop them all.
    Writes the topology's secrets first, and removes them at the end."""
    from splitserve.launcher.run_secrets import client_tls, write_secrets

    os.makedirs(log_dir, exist_ok=True)
    console = QuietConsole(topology.names, log_dir)
    try:
        api_key = write_secrets(topology)
        mesh = Mesh(topology, console, client_tls(topology))
        start = time.perf_counter()
        try:
            try:
                mesh.start(timeout, threading.Event())
            except StartupError as exc:
                tail = "\n".join(mesh.tails(exc.culprits))
                raise MeshError(f"{exc} (logs in {log_dir})\n{tail}") from None
            started = time.perf_counter() - start
            yield RunningMesh(topology, mesh, log_dir, started, api_key, mesh.tls)
        finally:
            mesh.stop(STOP_GRACE_S)
    finally:
        console.close()
        if topology.secrets is not None:
            shutil.rmtree(topology.secrets.dir, ignore_errors=True)


@contextmanager
def mesh_in_phases(
    phases: Phases,
    start: str,
    stop: str,
    topology: Topology,
    log_dir: str,
    timeout: float,
    ready: Callable[[RunningMesh], object],
) -> Iterator[RunningMesh]:
    """`running_mesh` as two of a benchmark's phases: `start` covers launching it and `ready`
    (its warm-up), `stop` its shutdown once the block is done. Meanwhile its processes' CPU
    time counts as the benchmark's own."""
    with ExitStack() as stack:
        with phases(start):
            mesh = stack.enter_context(running_mesh(topology, log_dir, timeout))
            phases.pids = mesh.pids
            ready(mesh)
        yield mesh
        phases.begin(stop)
    phases.done(stop)


# ---- the client side --------------------------------------------------------------------------
class _WithApiKey:
    """`authorization: Bearer KEY` on a channel's calls."""

    def __init__(self, api_key: str) -> None:
        self.header = ("authorization", f"Bearer {api_key}")

    def _details(self, details: Any) -> Any:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self.header)
        return details._replace(metadata=metadata)


class _UnaryWithApiKey(_WithApiKey, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _StreamWithApiKey(_WithApiKey, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


def api_key_interceptors(api_key: str) -> list[grpc.aio.ClientInterceptor]:
    """For a grpc.aio channel, which takes one interceptor per kind of call."""
    return [_UnaryWithApiKey(api_key), _StreamWithApiKey(api_key)]


@dataclass
class StreamResult:
    """One Generate call as the client saw it; times are time.perf_counter() values."""

    sent: float
    first_token: float
    done: float
    token_ids: list[int] = field(default_factory=list)
    cached_prompt_tokens: int = 0

    @property
    def ttft(self) -> float:
        return self.first_token - self.sent


def generate_request(
    request_id: str,
    prompt: Sequence[int],
    num_tokens: int,
    *,
    cache_salt: str = "",
    disaggregate: bool | None = None,
) -> pb.GenerateRequest:
    """Exactly `num_tokens` greedy tokens (EOS ignored), from token ids: no tokenizer on the way."""
    from splitserve.v1 import pb

    req = pb.GenerateRequest(
        request_id=request_id,
        token_ids=pb.TokenIds(ids=list(prompt)),
        sampling=pb.SamplingOptions(
            max_tokens=num_tokens, min_tokens=num_tokens, temperature=0.0, ignore_eos=True
        ),
        cache_salt=cache_salt,
    )
    if disaggregate is not None:
        req.disaggregate = disaggregate
    return req


async def stream_generate(
    stub, request: pb.GenerateRequest, timeout: float = 600.0
) -> StreamResult:
    sent = time.perf_counter()
    first: float | None = None
    tokens: list[int] = []
    cached = 0
    async for resp in stub.Generate(request, timeout=timeout):
        if resp.token_ids and first is None:
            first = time.perf_counter()
        tokens.extend(resp.token_ids)
        if resp.HasField("usage"):
            cached = resp.usage.cached_prompt_tokens
    done = time.perf_counter()
    return StreamResult(sent, first if first is not None else done, done, tokens, cached)


async def wait_until_served(
    stub, request: pb.GenerateRequest, timeout: float = 60.0
) -> StreamResult:
    """The first request to a fresh router: retried while it doesn't see its workers yet."""
    import grpc

    deadline = time.monotonic() + timeout
    while True:
        try:
            return await stream_generate(stub, request)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def warm_up(
    mesh: RunningMesh,
    router: str,
    prompts: Sequence[Sequence[int]],
    num_tokens: int,
    tag: str,
    disaggregate: bool | None = None,
) -> None:
    """The first request retried until the router sees its workers, the others at once: every
    worker (each data-parallel replica, given enough prompts) has loaded its kernels."""
    from splitserve.v1 import rpc

    reqs = [
        generate_request(f"warmup-{tag}-{i}", prompt, num_tokens, cache_salt=f"warmup-{tag}",
                         disaggregate=disaggregate)
        for i, prompt in enumerate(prompts)
    ]  # fmt: skip
    async with mesh.channel(router) as channel:
        stub = rpc.InferenceStub(channel)
        await wait_until_served(stub, reqs[0])
        await asyncio.gather(*(stream_generate(stub, r) for r in reqs[1:]))


async def run_workload(
    mesh: RunningMesh,
    router: str,
    requests: Sequence[BenchRequest],
    tag: str,
    repeats: int = 1,
    disaggregate: bool | None = None,
) -> tuple[list[ThroughputResult], dict[str, list[int]]]:
    """Every request at once, each its own Generate stream, timed from the first send to the
    last token; `repeats` times, each under its own cache salt (a repeat must not find the
    previous run's prompts in the worker's prefix cache). Tokens are the first run's."""
    from splitserve.v1 import rpc

    runs: list[ThroughputResult] = []
    tokens: dict[str, list[int]] = {}
    async with mesh.channel(router) as channel:
        stub = rpc.InferenceStub(channel)
        for k in range(repeats):
            reqs = [
                generate_request(f"{tag}-{k}-{r.request_id}", r.prompt_token_ids, r.output_len,
                                 cache_salt=f"{tag}-{k}", disaggregate=disaggregate)
                for r in requests
            ]  # fmt: skip
            start = time.perf_counter()
            results = await asyncio.gather(*(stream_generate(stub, q) for q in reqs))
            generated = sum(len(r.token_ids) for r in results)
            check_generated(f"the mesh ({tag})", generated, requests)
            runs.append(ThroughputResult(generated, max(r.done for r in results) - start))
            tokens = tokens or {
                r.request_id: res.token_ids for r, res in zip(requests, results, strict=True)
            }
    return runs, tokens


@contextmanager
def bench_errors(log_dir: str | None) -> Iterator[None]:
    """A failed request or a mesh that would not start, as the one-line BenchError the CLI
    prints (a startup failure's log tails go to stderr first)."""
    from splitserve.bench import BenchError

    try:
        yield
    except grpc.aio.AioRpcError as exc:
        hint = f" (services' logs in {log_dir})" if log_dir else " (rerun with --log-dir)"
        message = f"a request to the mesh failed: {exc.code().name}: {exc.details()}{hint}"
        raise BenchError(message) from None
    except MeshError as exc:
        print(str(exc), file=sys.stderr)
        hint = "" if log_dir else "; rerun with --log-dir DIR to keep every service's log"
        raise BenchError(str(exc).splitlines()[0] + hint) from None


# ---- kvstore and metrics ----------------------------------------------------------------------
async def store_match(stub, keys: Sequence[bytes]) -> int:
    """How many leading keys of a hash chain the kvstore holds."""
    from splitserve.v1 import pb

    if not keys:
        return 0
    return (await stub.Match(pb.MatchRequest(keys=list(keys)), timeout=10.0)).num_matched


async def wait_stored(stub, keys: Sequence[bytes], timeout: float = 30.0) -> bool:
    """Until every key is in the kvstore (a prefill's write-back is asynchronous)."""
    deadline = time.monotonic() + timeout
    while await store_match(stub, keys) < len(keys):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def parse_metrics(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a Prometheus text exposition: (name, sorted label items) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def http_get(url: str, timeout: float = 10.0, headers: dict[str, str] | None = None) -> Any:
    """GET `url` (a response to use as a context manager), never through a proxy: the mesh is
    on loopback."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return opener.open(urllib.request.Request(url, headers=headers or {}), timeout=timeout)


def scrape_metrics(
    url: str, timeout: float = 10.0, headers: dict[str, str] | None = None
) -> dict[tuple[str, tuple], float]:
    with http_get(url, timeout, headers) as resp:
        return parse_metrics(resp.read().decode())


def sample(samples: dict[tuple[str, tuple], float], name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 if none)."""
    want = set(labels.items())
    return sum(v for (n, lbl), v in samples.items() if n == name and want <= set(lbl))
