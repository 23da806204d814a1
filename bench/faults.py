"""`splitserve bench faults`: the fault suite, one scenario per row of docs/reliability.md.

Two meshes started the way `splitserve up` starts them (mutual TLS inside, an API key at the
router, the launcher's supervision restarting whatever dies), on this machine's loopback:

- **disaggregated**: kvstore on a Redis server of its own (started here, so it can be killed),
  one prefill worker, two decode workers, the router. Each fault scenario sends the same
  requests (greedy streams, plus one seeded, sampled stream) under a cache salt of its own, so
  no scenario rides on another's cached prefixes; a fault is injected at a chosen moment; every
  stream's tokens are compared with the no-failure run's.
- **small pool**: one colocated worker with `--max-num-seqs 2` and no router queue, for the
  overload and deadline scenarios.

For every scenario the table counts: requests sent; completed (a finish reason); completed
with exactly the no-failure run's tokens; migrations the router made (its
splitserve_router_migrations_total, all phases); requests that failed with a clean error (a
gRPC status with a message, or an HTTP 4xx/5xx with an OpenAI error body); hung (no answer
within the scenario's time limit, cancelled by this client); lost (a stream that ended with
neither a finish reason nor an error); KV blocks still held by requests once the scenario is
over (each worker's own count, from GetLoad, after a settling wait); and the time to recover:
from the fault to the moment every service is up and SERVING again, the router sees every
worker healthy (and for Redis, the kvstore's backend answering), confirmed by a new request
(not itself timed: under the scenario's load it waits its turn). A stopped process is
continued, and a killed Redis restarted, HOLD_S (5 s) after the fault; a killed service is
restarted by the supervision (its model load included). `max gap` is the longest pause
between two tokens of one stream: what a client saw of the failure.

The security rows each send one request that must be refused: a Register on the router's
internal port without a client certificate, a kvstore Put without one, a Register with a
CA-signed certificate of the wrong role, and a generation without the API key.

    splitserve bench faults                                     # SmolLM2, ~10 min on 2 cores
    splitserve bench faults --quick --model TINY_HF_FOLDER      # what CI runs

The last line printed is `faults_ok: true|false` (0 hung, 0 lost, 0 leaked everywhere, and at
least 95% of the streams of each migration scenario identical to the no-failure run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from splitserve.bench.report import final_line, percentile, write_json

FINAL_KEY = "faults_ok"
MIGRATION_IDENTICAL_TARGET = 0.95
OVERLOAD_TTFT_TARGET = 3.0  # admitted p99 TTFT under 4x load / unloaded p99
OVERLOAD_SHED_TARGET_S = 0.100  # every refused request answered within this
SEED = 1234
HOLD_S = 5.0  # after the fault: a stopped process is continued, a killed Redis restarted
TOPICS = ("rivers", "bread", "owls", "glass", "trains", "salt", "maps", "bees", "kites", "moss")


@dataclass(frozen=True)
class FaultSettings:
    model: str | None = None  # default: the SmolLM2 GGUF
    streams: int = 8  # greedy streams per scenario (plus one seeded, sampled one)
    max_tokens: int = 160  # per stream: long enough that every stream is mid-way at the fault
    long_prompt_tokens: int = 600  # the before-first-token scenarios' prompts (prefilled remotely)
    overload_waves: int = 5
    cut_tokens: int = 1200  # the router-drain scenario's streams: far longer than its 2 s drain
    scenario_timeout_s: float = 240.0  # a stream with no answer by then counts as hung
    settle_s: float = 30.0  # how long KV may take to return to the pool after a scenario
    kv_cache_mib: int = 96
    log_dir: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.streams <= len(TOPICS):
            raise ValueError(f"--streams must be in [1, {len(TOPICS)}]")
        if self.max_tokens < 16:
            raise ValueError("--max-tokens must be at least 16")


QUICK = dict(streams=4, max_tokens=96, long_prompt_tokens=300, overload_waves=3)


@dataclass
class Outcome:
    """One row of the table."""

    scenario: str
    sent: int = 0
    completed: int = 0
    identical: int = 0
    migrations: int = 0
    clean_errors: int = 0
    hung: int = 0
    lost: int = 0
    leaked_blocks: int = 0
    recovery_s: float | None = None
    max_gap_s: float | None = None
    expect_identical: bool = False  # a migration scenario: held to the 95% target
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        if self.hung or self.lost or self.leaked_blocks:
            return False
        if self.expect_identical and self.sent:
            return self.identical >= MIGRATION_IDENTICAL_TARGET * self.sent
        return True


# ---- the client side -----------------------------------------------------------------------------
@dataclass
class StreamRecord:
    name: str
    token_ids: list[int] = field(default_factory=list)
    finish: int = 0
    error: str | None = None
    hung: bool = False
    last_token_at: float | None = None
    max_gap_s: float = 0.0

    def add(self, token_ids: Sequence[int]) -> None:
        now = time.monotonic()
        if token_ids:
            if self.last_token_at is not None:
                self.max_gap_s = max(self.max_gap_s, now - self.last_token_at)
            self.last_token_at = now
            self.token_ids += token_ids


async def run_stream(stub: Any, request: Any, record: StreamRecord, timeout_s: float) -> None:
    """One Generate call, recorded; never raises for the call's own failure."""
    import grpc

    call = stub.Generate(request, timeout=timeout_s + 60)
    try:
        async with asyncio.timeout(timeout_s):
            async for resp in call:
                record.add(resp.token_ids)
                record.finish = resp.finish_reason or record.finish
    except TimeoutError:
        record.hung = True
        call.cancel()
    except grpc.aio.AioRpcError as e:
        record.error = f"{e.code().name}: {e.details()}"


def greedy_request(pb: Any, topic: str, max_tokens: int, salt: str, prompt: str | None = None):
    return pb.GenerateRequest(
        prompt=prompt or f"Here is a long story about {topic}:",
        sampling=pb.SamplingOptions(max_tokens=max_tokens, temperature=0, ignore_eos=True),
        cache_salt=salt,
    )


def seeded_request(pb: Any, max_tokens: int, salt: str):
    return pb.GenerateRequest(
        prompt="Once upon a time, in a land far away,",
        sampling=pb.SamplingOptions(
            max_tokens=max_tokens, temperature=1.0, seed=SEED, ignore_eos=True
        ),
        cache_salt=salt,
    )


def long_prompt(topic: str, tokens: int) -> str:
    """About `tokens` tokens of plain text about `topic` (a sentence is ~12 tokens)."""
    sentences = [
        f"Note {i} on {topic}: the {topic} of district {i} were counted at {i * 37 % 101}."
        for i in range(tokens // 12 + 1)
    ]
    return " ".join(sentences) + f" Summarise what is known about {topic}:"


# ---- the meshes ----------------------------------------------------------------------------------
class RedisServer:
    """A redis-server of our own on a free port, so a scenario can kill and restart it."""

    def __init__(self, port: int, workdir: str) -> None:
        self.port = port
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError(
                "redis-server is not installed (scripts/ensure-redis.sh installs it)"
            )
        port = ["--port", str(self.port), "--bind", "127.0.0.1"]
        ephemeral = ["--save", "", "--appendonly", "no", "--dir", self.workdir]
        self.proc = subprocess.Popen(
            [exe, *port, *ephemeral], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while not _port_open(self.port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not listen on {self.port}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _with_flags(spec: Any, extra: Sequence[str]) -> Any:
    return dataclasses.replace(spec, args=[*spec.args, *extra])


def _topology(
    settings: FaultSettings, up_flags: Sequence[str], router_flags: Sequence[str], secrets: str
) -> Any:
    from splitserve.bench.mesh_runner import local_topology, place, router_ports, up_args

    engine = ["--kv-cache-mib", str(settings.kv_cache_mib), "--threads", "1"]
    if settings.model:
        engine += ["--model", settings.model]

    def build(offset: int) -> Any:
        grpc_port, http_port = router_ports(offset, 2)
        args = up_args(
            engine,
            *up_flags,
            *("--port-offset", str(offset), "--grpc-port", str(grpc_port)),
            *("--http-port", str(http_port)),
        )
        base = local_topology(args, secrets)
        services = []
        for spec in base.services:
            if spec.name == "router":
                spec = _with_flags(spec, ["--health-interval", "0.5", *router_flags])
            elif spec.module in ("splitserve.prefill", "splitserve.decode"):
                spec = _with_flags(spec, ["--kvstore-timeout-s", "5"])
            services.append(spec)
        return dataclasses.replace(base, services=services)

    return place(build)


class Fleet:
    """A running mesh, supervised, with the clients the scenarios need."""

    def __init__(self, running: Any, redis: RedisServer | None) -> None:
        from splitserve.v1 import pb, rpc

        self.m = running
        self.redis = redis
        self.pb = pb
        self.rpc = rpc
        self._channels: dict[str, Any] = {}  # grpc.aio: made inside the loop that uses them
        self._stop = threading.Event()
        self.supervisor = threading.Thread(
            target=running.mesh.supervise, args=(self._stop,), daemon=True
        )
        self.supervisor.start()

    def close(self) -> None:
        self._stop.set()
        self.supervisor.join(30)

    def children(self) -> dict[str, Any]:
        return self.m.mesh.children

    def workers(self, role: str | None = None) -> list[str]:
        names = [s.name for s in self.m.topology.workers]
        return [n for n in names if role is None or n.rsplit("-", 1)[0] == role]

    def _channel(self, name: str) -> Any:
        if name not in self._channels:
            self._channels[name] = self.m.channel(name)
        return self._channels[name]

    @property
    def router(self) -> Any:
        return self.rpc.InferenceStub(self._channel("router"))

    def stub(self, name: str) -> Any:
        self._channel(name)
        kind = self.rpc.PrefillStub if name.startswith("prefill") else self.rpc.DecodeStub
        return kind(self._channels[name])

    def health(self) -> tuple[int, dict[str, Any]]:
        from splitserve.bench.mesh_runner import http_get

        port = self.m.topology.router.ports["http"]
        try:
            with http_get(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")
        except OSError:
            return 0, {}

    def _router_metrics(self) -> dict[tuple[str, tuple], float]:
        from splitserve.bench.mesh_runner import scrape_metrics

        url = f"http://127.0.0.1:{self.m.topology.router.ports['http']}/metrics"
        auth = {"Authorization": f"Bearer {self.m.api_key}"} if self.m.api_key else {}
        return scrape_metrics(url, 5, auth)

    def metric(self, name: str, **labels: str) -> float:
        from splitserve.bench.mesh_runner import sample

        return sample(self._router_metrics(), name, **labels)

    def outstanding(self) -> dict[str, float]:
        """The router's own count of requests on each worker."""
        return {
            dict(labels).get("worker", ""): v
            for (n, labels), v in self._router_metrics().items()
            if n == "splitserve_router_worker_outstanding_requests"
        }

    def busiest(self, role: str) -> str:
        """The worker of `role` the router has the most requests on."""
        counts = self.outstanding()
        names = self.workers(role)
        return max(names, key=lambda w: counts.get(self.m.address(w), 0.0))

    def signal(self, name: str, sig: int) -> None:
        self.children()[name].signal_group(sig)

    async def held_blocks(self) -> dict[str, int]:
        """KV blocks each live worker's requests hold (0 when idle)."""
        out: dict[str, int] = {}
        for name in self.workers():
            try:
                load = await self.stub(name).GetLoad(self.pb.LoadRequest(), timeout=5)
            except Exception:  # a worker restarting: it holds nothing of the old requests
                out[name] = 0
                continue
            busy = load.num_running + load.num_waiting
            out[name] = round(load.kv_usage * load.num_total_blocks) + busy
        return out

    async def settle(self, timeout_s: float) -> int:
        """Wait for every worker and the router to let go of every request; what is left."""
        deadline = time.monotonic() + timeout_s
        while True:
            held = sum((await self.held_blocks()).values())
            routed = sum(self.outstanding().values())
            if (held == 0 and routed == 0) or time.monotonic() > deadline:
                return held + int(routed)
            await asyncio.sleep(0.25)

    async def serving(self, store: bool = False) -> bool:
        """Every service alive and SERVING, and every worker healthy to the router; with
        `store`, the kvstore's backend answering too."""
        for child in self.children().values():
            if child.proc.poll() is not None or not child.ready:
                return False
        status, body = self.health()
        if status != 200 or not all(body.get("workers", {}).values()):
            return False
        if store:
            try:
                stub = self.rpc.KVStoreStub(self._channel("kvstore"))
                await stub.Stats(self.pb.StatsRequest(), timeout=2)
            except Exception:  # its backend (Redis) is still down: UNAVAILABLE
                return False
        return True

    async def answers(self) -> bool:
        record = StreamRecord("probe")
        probe = greedy_request(self.pb, "probes", 2, salt="probe")
        await run_stream(self.router, probe, record, 60)
        return record.finish != 0

    async def wait_whole(
        self, since: float, store: bool = False, timeout_s: float = 180.0
    ) -> float | None:
        """Seconds from `since` until the mesh is whole again (`serving`), confirmed by a new
        request answered; None if not within `timeout_s`. The confirming request is not
        timed: under the scenario's load it waits its turn like any other."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if await self.serving(store):
                whole_at = time.monotonic() - since
                if await self.answers():
                    return whole_at
            await asyncio.sleep(0.1)
        return None


@contextlib.contextmanager
def fleet(
    settings: FaultSettings,
    log_dir: str,
    up_flags: Sequence[str],
    router_flags: Sequence[str] = (),
    with_redis: bool = False,
) -> Iterator[Fleet]:
    from splitserve.bench.mesh_runner import running_mesh, secrets_dir
    from splitserve.launcher.up import free_port

    os.makedirs(log_dir, exist_ok=True)
    redis = RedisServer(free_port(), log_dir) if with_redis else None
    flags = list(up_flags)
    if redis is not None:
        redis.start()
        flags += ["--redis-url", redis.url]
    try:
        topology = _topology(settings, flags, router_flags, secrets_dir())
        with running_mesh(topology, log_dir, timeout=600) as running:
            f = Fleet(running, redis)
            try:
                yield f
            finally:
                f.close()
    finally:
        if redis is not None:
            redis.stop()


# ---- fault scenarios on the disaggregated mesh ---------------------------------------------------
@dataclass(frozen=True)
class Fault:
    """What to do, to whom, and when."""

    target: str  # "decode" | "prefill" | "kvstore" | "redis" | "router"
    action: str  # "kill" | "stop" | "term"
    moment: str  # "mid_stream" | "before_first_token"
    long_streams: bool = False  # streams far longer than the drain (the router's cut)


SCENARIOS: list[tuple[str, Fault | None]] = [
    ("no failure (reference)", None),
    ("decode SIGKILL mid-stream", Fault("decode", "kill", "mid_stream")),
    ("decode SIGSTOP mid-stream", Fault("decode", "stop", "mid_stream")),
    ("decode SIGKILL before first token", Fault("decode", "kill", "before_first_token")),
    (
        "prefill SIGKILL during prefill / KV transfer",
        Fault("prefill", "kill", "before_first_token"),
    ),
    ("prefill SIGSTOP during prefill", Fault("prefill", "stop", "before_first_token")),
    ("kvstore SIGKILL", Fault("kvstore", "kill", "before_first_token")),
    ("kvstore SIGSTOP", Fault("kvstore", "stop", "before_first_token")),
    ("Redis SIGKILL, restarted", Fault("redis", "kill", "before_first_token")),
    (
        "router SIGTERM mid-stream (2 s drain)",
        Fault("router", "term", "mid_stream", long_streams=True),
    ),
]


class Suite:
    def __init__(self, settings: FaultSettings, f: Fleet) -> None:
        self.s = settings
        self.f = f
        self.reference: dict[str, dict[str, list[int]]] = {}  # moment -> stream -> tokens

    def requests(self, moment: str, salt: str, long_streams: bool = False) -> dict[str, Any]:
        pb, s = self.f.pb, self.s
        topics = TOPICS[: s.streams]
        if long_streams:
            return {t: greedy_request(pb, t, s.cut_tokens, salt) for t in topics}
        if moment == "before_first_token":  # long prompts: the prefill worker computes them
            reqs = {
                t: greedy_request(
                    pb, t, s.max_tokens // 2, salt, long_prompt(t, s.long_prompt_tokens)
                )
                for t in topics
            }
            for r in reqs.values():
                r.disaggregate = True
        else:
            reqs = {t: greedy_request(pb, t, s.max_tokens, salt) for t in topics}
        reqs["seeded"] = seeded_request(pb, s.max_tokens, salt)
        return reqs

    async def run(self, name: str, fault: Fault | None, index: int) -> list[Outcome]:
        moments = ("mid_stream", "before_first_token") if fault is None else (fault.moment,)
        return [await self._run(name, fault, moment, f"s{index}-{moment}") for moment in moments]

    async def _run(self, name: str, fault: Fault | None, moment: str, salt: str) -> Outcome:
        f = self.f
        reqs = self.requests(moment, salt, fault is not None and fault.long_streams)
        records = {n: StreamRecord(n) for n in reqs}
        migrations0 = f.metric("splitserve_router_migrations_total")
        tasks = [
            asyncio.create_task(run_stream(f.router, r, records[n], self.s.scenario_timeout_s))
            for n, r in reqs.items()
        ]
        label = name if fault is not None or moment == "mid_stream" else f"{name}, long prompts"
        migrating = fault is not None and not fault.long_streams
        out = Outcome(label, sent=len(reqs), expect_identical=migrating)
        fault_at: float | None = None
        if fault is not None:
            await self._wait_for_moment(fault, records, tasks)
            started = sum(1 for r in records.values() if r.token_ids)
            out.notes.append(f"{started}/{len(records)} streams had tokens at the fault")
            fault_at = time.monotonic()
            undo = self._inject(fault, out)
            recovery = asyncio.create_task(self._recover(fault, fault_at, undo))
        await asyncio.gather(*tasks)
        out.migrations = int(f.metric("splitserve_router_migrations_total") - migrations0)
        reference = self.reference.get(moment)
        for n, rec in records.items():
            if rec.hung:
                out.hung += 1
            elif rec.error is not None:
                out.clean_errors += 1
            elif rec.finish:
                out.completed += 1
                if reference is None or reference.get(n) == rec.token_ids:
                    out.identical += 1
            else:
                out.lost += 1
        out.max_gap_s = max((r.max_gap_s for r in records.values()), default=0.0)
        errors = sorted({r.error.split(":")[0] for r in records.values() if r.error})
        if errors:
            out.notes.append("errors: " + ", ".join(errors))
        if fault is None:
            self.reference[moment] = {n: r.token_ids for n, r in records.items()}
        if fault_at is not None:
            out.recovery_s = await recovery
            if out.recovery_s is None:
                out.notes.append("did not recover within 180 s")
        out.leaked_blocks = await f.settle(self.s.settle_s)
        return out

    async def _wait_for_moment(
        self,
        fault: Fault,
        records: dict[str, StreamRecord],
        tasks: list[asyncio.Task[None]],
    ) -> None:
        """Mid-stream: every stream has a few tokens. Before the first token: the router has
        dispatched requests to the target's kind of worker (for a decode worker: admitted
        them there while a prefill worker computes their prompts), or, for the kvstore and
        Redis, the requests are just sent."""
        deadline = time.monotonic() + self.s.scenario_timeout_s
        if fault.moment == "before_first_token":
            if fault.target not in ("decode", "prefill"):
                await asyncio.sleep(0.05)
                return
            addresses = [self.f.m.address(w) for w in self.f.workers(fault.target)]
            while time.monotonic() < deadline and not all(t.done() for t in tasks):
                counts = self.f.outstanding()
                if sum(counts.get(a, 0.0) for a in addresses) >= 1:
                    return
                await asyncio.sleep(0.005)
            return
        while not all(len(r.token_ids) >= 4 for r in records.values()):
            if all(t.done() for t in tasks) or time.monotonic() > deadline:
                return
            await asyncio.sleep(0.02)

    async def _recover(
        self, fault: Fault, fault_at: float, undo: Callable[[], Awaitable[None]]
    ) -> float | None:
        """Seconds from the fault until the mesh is whole again; the streams go on meanwhile."""
        await undo()
        return await self.f.wait_whole(fault_at, store=fault.target == "redis")

    def _inject(self, fault: Fault, out: Outcome) -> Callable[[], Awaitable[None]]:
        """Do it; returns what must happen before the mesh can be whole again: a stopped
        process continued and a killed Redis restarted (HOLD_S later), or a killed service
        restarted by the supervision."""
        f = self.f

        async def after_hold(then: Callable[[], None]) -> None:
            await asyncio.sleep(HOLD_S)
            then()

        if fault.target == "redis":
            assert f.redis is not None
            f.redis.kill()
            # On the same port: the kvstore reconnects on its own.
            return lambda: after_hold(f.redis.start)  # type: ignore[union-attr]
        by_load = fault.target in ("decode", "prefill")
        name = f.busiest(fault.target) if by_load else fault.target
        out.notes.append(f"target {name}")
        if fault.action == "stop":
            f.signal(name, signal.SIGSTOP)
            return lambda: after_hold(lambda: f.signal(name, signal.SIGCONT))
        pid = f.children()[name].proc.pid
        f.signal(name, signal.SIGKILL if fault.action == "kill" else signal.SIGTERM)

        async def restarted() -> None:
            while f.children()[name].proc.pid == pid:
                await asyncio.sleep(0.05)

        return restarted


# ---- security rows -------------------------------------------------------------------------------
async def security_rows(f: Fleet) -> list[Outcome]:
    import grpc

    from splitserve.services.security import open_channel

    pb, rpc = f.pb, f.rpc
    rows = []

    async def refused(name: str, call: Callable[[], Awaitable[Any]], codes: set[str]) -> None:
        row = Outcome(name, sent=1)
        try:
            await call()
            row.lost = 1
            row.notes.append("accepted: NOT refused")
        except grpc.aio.AioRpcError as e:
            if e.code().name in codes:
                row.clean_errors = 1
                row.notes.append(e.code().name)
            else:
                row.lost = 1
                row.notes.append(f"unexpected {e.code().name}")
        rows.append(row)

    topo = f.m.topology
    internal = f"127.0.0.1:{topo.router.ports['internal']}"
    kvstore = f.m.address("kvstore")
    reg = pb.RegisterRequest(address="127.0.0.1:1", role="decode", model="x", worker_id="rogue")
    handshake = {"UNAVAILABLE"}  # no client certificate: the TLS handshake fails

    async def plain(address: str, fn: Callable[[Any], Awaitable[Any]]) -> Any:
        async with grpc.aio.insecure_channel(address) as ch:
            return await fn(ch)

    await refused(
        "rogue Register, no client certificate",
        lambda: plain(internal, lambda ch: rpc.RegistryStub(ch).Register(reg, timeout=5)),
        handshake,
    )
    block = pb.BlockPayload(key=b"k" * 32, payload=b"x" * 64)

    async def put(ch: Any) -> Any:
        return await rpc.KVStoreStub(ch).Put(iter([block]), timeout=5)

    await refused("kvstore Put, no client certificate", lambda: plain(kvstore, put), handshake)

    # A certificate from the mesh's CA, but a kvstore's: not allowed to join the pools.
    from splitserve.launcher.certs import CertBundle
    from splitserve.services.security import TLSConfig

    assert topo.secrets is not None
    bundle = CertBundle(topo.secrets.dir)
    bundle.write([("bench-intruder", "kvstore")])
    tls = TLSConfig.load(
        str(bundle.cert_path("bench-intruder")),
        str(bundle.key_path("bench-intruder")),
        str(bundle.ca_path),
    )

    async def wrong_role() -> Any:
        ch = open_channel(internal, tls, [])
        try:
            return await rpc.RegistryStub(ch).Register(reg, timeout=5)
        finally:
            await ch.close()

    await refused("rogue Register, a kvstore's certificate", wrong_role, {"PERMISSION_DENIED"})

    async def no_key() -> Any:
        async with grpc.aio.insecure_channel(f.m.address("router")) as ch:
            req = greedy_request(pb, "keys", 2, salt="nokey")
            async for _ in rpc.InferenceStub(ch).Generate(req, timeout=10):
                pass

    await refused("generation without the API key", no_key, {"UNAUTHENTICATED"})
    return rows


# ---- overload and deadlines on the small pool ----------------------------------------------------
async def _sse_ttft(session: Any, url: str, body: dict[str, Any], headers: dict[str, str]):
    """(status, seconds to the first token or to the refusal, Retry-After)."""
    start = time.monotonic()
    async with session.post(url, json=body, headers=headers) as resp:
        if resp.status != 200:
            await resp.read()
            return resp.status, time.monotonic() - start, resp.headers.get("Retry-After")
        first = None
        async for line in resp.content:
            if first is None and line.startswith(b"data: {") and b'"text": ""' not in line:
                first = time.monotonic() - start
        return 200, first if first is not None else time.monotonic() - start, None


def p99(values: Sequence[float]) -> float:
    return percentile(values, 0.99)


async def overload_rows(settings: FaultSettings, f: Fleet, capacity: int) -> list[Outcome]:
    import aiohttp

    port = f.m.topology.router.ports["http"]
    url = f"http://127.0.0.1:{port}/v1/completions"
    headers = {"Authorization": f"Bearer {f.m.api_key}"} if f.m.api_key else {}

    def body(i: int, max_tokens: int) -> dict[str, Any]:
        return {
            "prompt": f"Request {i}: tell me about {TOPICS[i % len(TOPICS)]}.",
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
        }

    rows = []
    async with aiohttp.ClientSession() as session:
        unloaded = []
        for i in range(8):
            status, ttft, _ = await _sse_ttft(session, url, body(i, 16), headers)
            if status == 200:
                unloaded.append(ttft)
        load = 4 * capacity
        row = Outcome(f"overload: {load} at once, {capacity} slots, x{settings.overload_waves}")
        admitted, shed, retry_after = [], [], set()
        for wave in range(settings.overload_waves):
            results = await asyncio.gather(
                *(_sse_ttft(session, url, body(wave * load + i, 32), headers) for i in range(load))
            )
            for status, seconds, retry in results:
                row.sent += 1
                if status == 200:
                    row.completed += 1
                    admitted.append(seconds)
                elif status == 429:
                    row.clean_errors += 1
                    shed.append(seconds)
                    retry_after.add(retry)
                else:
                    row.lost += 1
        ratio = p99(admitted) / p99(unloaded) if unloaded and admitted else float("nan")
        row.notes += [
            f"unloaded p99 TTFT {p99(unloaded) * 1000:.0f} ms",
            f"admitted p99 TTFT {p99(admitted) * 1000:.0f} ms ({ratio:.2f}x; target <= "
            f"{OVERLOAD_TTFT_TARGET:g}x)",
            f"429 within {max(shed, default=0) * 1000:.0f} ms (target <= "
            f"{OVERLOAD_SHED_TARGET_S * 1000:.0f})",
            f"Retry-After {', '.join(sorted(str(r) for r in retry_after))}",
        ]
        row.leaked_blocks = await f.settle(settings.settle_s)
        rows.append(row)

        row = Outcome("deadline: X-Request-Timeout 1 s, 4 long requests")
        long_body = {**body(0, 1500), "stream": False}
        timed = {**headers, "X-Request-Timeout": "1"}

        async def one() -> tuple[int, float]:
            start = time.monotonic()
            async with session.post(url, json=long_body, headers=timed) as resp:
                await resp.read()
                return resp.status, time.monotonic() - start

        results = await asyncio.gather(*(one() for _ in range(4)))
        for status, _ in results:
            row.sent += 1
            if status == 200:
                row.completed += 1
            else:  # an OpenAI error body with its status (504 past the deadline, 429 full)
                row.clean_errors += 1
        statuses = ", ".join(str(status) for status, _ in sorted(results))
        row.notes.append(f"statuses {statuses}; answered after {max(s for _, s in results):.2f} s")
        row.leaked_blocks = await f.settle(settings.settle_s)
        rows.append(row)
    return rows


# ---- the whole suite -----------------------------------------------------------------------------
async def _disaggregated(settings: FaultSettings, f: Fleet) -> list[Outcome]:
    suite = Suite(settings, f)
    rows: list[Outcome] = []
    for i, (name, fault) in enumerate(SCENARIOS):
        _say(f"scenario: {name}")
        rows += await suite.run(name, fault, i)
    rows += await security_rows(f)
    return rows


def run_suite(settings: FaultSettings) -> list[Outcome]:
    log_dir = settings.log_dir or tempfile.mkdtemp(prefix="splitserve-faults-")
    rows: list[Outcome] = []
    _say(f"logs in {log_dir}")
    with fleet(
        settings,
        os.path.join(log_dir, "disaggregated"),
        ["--prefill", "1", "--decode", "2"],
        ["--drain-seconds", "2", "--stream-idle-timeout-s", "10"],
        with_redis=True,
    ) as f:
        rows += asyncio.run(_disaggregated(settings, f))
    capacity = 2
    with fleet(
        settings,
        os.path.join(log_dir, "small-pool"),
        ["--colocated", "--decode", "1", "--max-num-seqs", str(capacity)],
        ["--max-queued-requests", "0"],
    ) as f:
        rows += asyncio.run(overload_rows(settings, f, capacity))
    return rows


# ---- report --------------------------------------------------------------------------------------
COLUMNS = (
    "scenario", "sent", "completed", "identical", "migrations", "clean errors", "hung", "lost",
    "leaked blocks", "recovery s", "max gap s", "notes",
)  # fmt: skip


def _cells(r: Outcome) -> list[str]:
    def seconds(x: float | None, digits: int) -> str:
        return "-" if x is None else f"{x:.{digits}f}"

    counts = (r.sent, r.completed)
    rest = (r.migrations, r.clean_errors, r.hung, r.lost, r.leaked_blocks)
    return [
        r.scenario,
        *map(str, counts),
        str(r.identical) if r.expect_identical else "-",
        *map(str, rest),
        seconds(r.recovery_s, 1),
        seconds(r.max_gap_s, 2),
        "; ".join(r.notes),
    ]


def table(rows: Sequence[Outcome]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def all_ok(rows: Sequence[Outcome]) -> bool:
    return all(r.ok for r in rows)


def _say(text: str) -> None:
    print(f"[faults] {text}", file=sys.stderr, flush=True)


def add_parser(bsub: Any) -> None:
    p = bsub.add_parser(
        "faults",
        help="the fault suite: kill, stop and starve each service under load; a table of what "
        "the clients saw",
        description="Start real meshes (mTLS, API key, supervision as `splitserve up`), send "
        "streams, SIGKILL/SIGSTOP/SIGTERM each kind of service at chosen moments, kill Redis, "
        "try unauthenticated calls, overload a small pool and expire deadlines; print one "
        f"row per scenario. The last line is `{FINAL_KEY}: true|false`.",
    )
    d = FaultSettings()
    p.add_argument("--model", default=None, help="a .gguf file or HF folder (default: SmolLM2)")
    p.add_argument("--streams", type=int, default=d.streams, help="greedy streams per scenario")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="per stream")
    p.add_argument("--quick", action="store_true", help="fewer and shorter streams (CI)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the rows as JSON")
    p.add_argument("--markdown", default=None, metavar="PATH", help="write the table")
    p.add_argument("--log-dir", default=None, help="service logs (default: a temp dir)")
    p.set_defaults(run=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    from splitserve.bench import BenchError

    overrides: dict[str, Any] = dict(QUICK) if args.quick else {}
    if args.streams != FaultSettings().streams or not args.quick:
        overrides["streams"] = args.streams
    if args.max_tokens != FaultSettings().max_tokens or not args.quick:
        overrides["max_tokens"] = args.max_tokens
    try:
        settings = FaultSettings(model=args.model, log_dir=args.log_dir, **overrides)
    except ValueError as e:
        raise BenchError(str(e)) from None
    rows = run_suite(settings)
    text = table(rows)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(text + "\n")
    if args.json:
        write_json(args.json, [dataclasses.asdict(r) for r in rows])
    ok = all_ok(rows)
    print(final_line(FINAL_KEY, ok))
    return 0 if ok else 1
