"""Real meshes for the end-to-end tests, started by the launcher's own code.

`start_mesh("--prefill", "2", ...)` parses `splitserve up` flags into a `Topology`, adjusts a
few specs (a Redis key prefix of this run's own, extra worker flags, the tracing exporter) and
runs it under `splitserve.launcher.supervisor.Mesh`: the processes, the health waits, the log
files and the ordered shutdown are exactly what `splitserve up` does. Ports are found the way
the launcher's own tests find them (free router ports, a random --port-offset whose plan is
free).

Secured as `up` secures it, by default: certificates, a mesh secret and an API key in
`<log_dir>/secrets`, mutual TLS on every internal connection. The helpers use them: channels
to internal services present the launcher's client certificate, the router channel and the
OpenAI client send the API key.

Also here: the checks every module ends with (`assert_idle`: no request, KV block, lease or
outstanding token left anywhere), metric scraping, and the reference engine's greedy output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import openai
import torch
from ports import up_args
from prometheus_client.parser import text_string_to_metric_families

from splitserve.engine.engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.tokenizer import Tokenizer
from splitserve.launcher import up
from splitserve.launcher.certs import CertBundle
from splitserve.launcher.run_secrets import client_tls, write_secrets
from splitserve.launcher.supervisor import Console, Mesh, StartupError
from splitserve.launcher.topology import ServiceSpec, Topology
from splitserve.services.security import TLSConfig, open_sync_channel
from splitserve.services.server import CHANNEL_OPTIONS
from splitserve.v1 import pb, rpc
from splitserve.workers.metrics import PREFIX as WORKER_PREFIX

# A shared Redis (other developers use db 0): our own database, and a key prefix of our own
# per run, deleted afterwards; never FLUSHDB/FLUSHALL.
REDIS_URL = os.environ.get("SPLITSERVE_E2E_REDIS_URL", "redis://127.0.0.1:6379/3")
# Small pools and one thread per worker: the test machine has two cores. 96 MiB holds 136
# blocks of 16 tokens (fp32 SmolLM2-135M: 720 KiB a block): room for a 1,050-token prompt.
ENGINE_FLAGS = ("--kv-cache-mib", "96", "--threads", "1")
# The default deadline is 1 s per kvstore call; fetching ~45 MB of fp32 blocks can take longer
# than that on a loaded 2-core box, and this suite is about *whether* blocks are shared, so
# give the store time (a timeout would make the worker recompute, and the test fail).
WORKER_FLAGS = ("--kvstore-timeout-s", "20")
STARTUP_TIMEOUT_S = 600.0
RPC_TIMEOUT_S = 300.0


# ---- ports ----------------------------------------------------------------------------------
# ---- the mesh -------------------------------------------------------------------------------
class ApiKeyInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer KEY` to every call that doesn't carry its own."""

    def __init__(self, api_key: str) -> None:
        self.header = ("authorization", f"Bearer {api_key}")

    def _with_key(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = list(details.metadata or [])
        if not any(k == "authorization" for k, _ in metadata):
            metadata.append(self.header)
        return _CallDetails(
            details.method, details.timeout, metadata, details.credentials,
            details.wait_for_ready, details.compression,
        )  # fmt: skip

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_key(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_key(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._with_key(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._with_key(details), requests)


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


@dataclass
class RunningMesh:
    topology: Topology
    mesh: Mesh
    console: Console
    log_dir: Path
    redis_prefix: str | None = None
    api_key: str | None = None  # what clients send the router (None: --no-auth)
    tls: TLSConfig | None = None  # the launcher's client certificate (None: --insecure)
    baseline_kv_usage: dict[str, float] = field(default_factory=dict)
    _channels: dict[str, grpc.Channel] = field(default_factory=dict)
    _supervisor: tuple[threading.Thread, threading.Event] | None = None

    # ---- addresses
    def port(self, service: str, role: str = "grpc") -> int:
        return self.topology.service(service).ports[role]

    def address(self, service: str) -> str:
        return f"127.0.0.1:{self.port(service)}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port('router', 'http')}"

    @property
    def workers(self) -> list[str]:
        return [s.name for s in self.topology.workers]

    def workers_of(self, role: str) -> list[str]:
        return [w for w in self.workers if w.rsplit("-", 1)[0] == role]

    @property
    def secrets_dir(self) -> Path:
        assert self.topology.secrets is not None
        return Path(self.topology.secrets.dir)

    # ---- clients
    def channel(self, service: str) -> grpc.Channel:
        """The router's public port with the API key; any other service's port with the
        launcher's client certificate."""
        if service not in self._channels:
            if service == "router":
                channel = grpc.insecure_channel(self.address(service), options=CHANNEL_OPTIONS)
                if self.api_key:
                    channel = grpc.intercept_channel(channel, ApiKeyInterceptor(self.api_key))
            else:
                channel = open_sync_channel(self.address(service), self.tls, CHANNEL_OPTIONS)
            self._channels[service] = channel
        return self._channels[service]

    def internal_address(self) -> str:
        """The router's internal port (splitserve.v1.Registry)."""
        return f"127.0.0.1:{self.port('router', 'internal')}"

    def inference(self) -> rpc.InferenceStub:
        return rpc.InferenceStub(self.channel("router"))

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.http_url}/v1",
            api_key=self.api_key or "unused",
            max_retries=0,
            timeout=RPC_TIMEOUT_S,
        )

    def http_post(self, path: str, body: bytes, timeout: float = 60.0) -> tuple[int, dict]:
        return http_post(f"{self.http_url}{path}", body, timeout, api_key=self.api_key)

    def tls_args(self, name: str, role: str = "worker") -> list[str]:
        """--tls-* flags for a process a test starts by hand (a certificate of its own);
        [] on a plaintext mesh."""
        if self.tls is None:
            return []
        CertBundle(self.secrets_dir).write([(name, role)])
        d = self.secrets_dir
        return [*("--tls-cert", str(d / f"{name}.crt"), "--tls-key", str(d / f"{name}.key")),
                *("--tls-ca", str(d / "ca.crt"))]  # fmt: skip

    def load(self, worker: str) -> pb.WorkerLoad:
        stub_type = rpc.PrefillStub if worker.startswith("prefill") else rpc.DecodeStub
        return stub_type(self.channel(worker)).GetLoad(pb.LoadRequest(), timeout=10)

    def kvstore_stats(self) -> pb.StatsResponse:
        return rpc.KVStoreStub(self.channel("kvstore")).Stats(pb.StatsRequest(), timeout=10)

    # ---- observation
    def worker_metric(self, worker: str, name: str, **labels: str) -> float:
        url = f"http://127.0.0.1:{self.port(worker, 'metrics')}/metrics"
        return scrape(url, WORKER_PREFIX + name, **labels)

    def router_metrics(self) -> str:
        return http_get(f"{self.http_url}/metrics", api_key=self.api_key)

    def log(self, service: str) -> str:
        return (self.log_dir / f"{service}.log").read_text(errors="replace")

    def wait_for_log(self, service: str, text: str, timeout: float = 10.0) -> str:
        """The service's log once it holds `text` (or as it is at the timeout). A child's lines
        reach the file through the launcher's pump thread, a moment after the child wrote them:
        a line logged just before an RPC's answer may not be there yet when the answer is."""
        deadline = time.monotonic() + timeout
        while text not in (got := self.log(service)) and time.monotonic() < deadline:
            time.sleep(0.05)
        return got

    def tails(self) -> str:
        return "\n".join(self.mesh.tails(list(self.mesh.children)))

    # ---- lifecycle
    def supervise(self) -> None:
        """Restart children that die, as `splitserve up` does once up (until `stop`)."""
        stop = threading.Event()
        thread = threading.Thread(target=self.mesh.supervise, args=(stop,), daemon=True)
        thread.start()
        self._supervisor = (thread, stop)

    def stop(self) -> None:
        if self._supervisor is not None:
            thread, stop = self._supervisor
            stop.set()
            thread.join(30)
            self._supervisor = None
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()
        try:
            self.mesh.stop(grace=20.0)
        finally:
            self.console.close()
            if self.redis_prefix:
                delete_redis_keys(self.redis_prefix)


def start_mesh(
    log_dir: Path,
    *up_flags: str,
    env: dict[str, str] | None = None,
    worker_flags: Sequence[str] = WORKER_FLAGS,
    redis: bool = False,
    router_flags: Sequence[str] = (),
) -> RunningMesh:
    """Start a mesh as `splitserve up <flags>` would, wait until every service is SERVING.
    `router_flags`: extra flags for the router (ones `up` has no option for)."""
    redis_prefix = f"splitserve:e2e:{os.getpid()}:{random.getrandbits(48):012x}:" if redis else None
    flags = [*up_flags, *ENGINE_FLAGS, "--log-level", "info"]
    if redis:
        flags += ["--redis-url", REDIS_URL]
    args = up.build_parser().parse_args(up_args(*flags))
    base = up.local_topology(args, str(log_dir / "secrets"))
    services = [
        _adjust(s, env or {}, worker_flags, redis_prefix, router_flags) for s in base.services
    ]
    topology = dataclasses.replace(base, services=services)
    up.check_ports_free(topology)
    api_key = write_secrets(topology, args.api_key)
    tls = client_tls(topology)
    console = Console(topology.names, str(log_dir))
    mesh = Mesh(topology, console, tls)
    running = RunningMesh(topology, mesh, console, log_dir, redis_prefix, api_key, tls)
    try:
        mesh.start(STARTUP_TIMEOUT_S, threading.Event())
    except StartupError as exc:
        tails = "\n".join(mesh.tails(exc.culprits))
        running.stop()
        raise RuntimeError(f"mesh did not start: {exc}\n{tails}") from None
    except BaseException:
        running.stop()
        raise
    try:
        wait_router_healthy(running)
        running.baseline_kv_usage = {w: running.load(w).kv_usage for w in running.workers}
        # kv_usage counts blocks owned by live requests (cached free blocks don't count).
        assert set(running.baseline_kv_usage.values()) == {0.0}, running.baseline_kv_usage
    except BaseException:
        running.stop()
        raise
    return running


def _adjust(
    spec: ServiceSpec,
    env: dict[str, str],
    worker_flags: Sequence[str],
    redis_prefix: str | None,
    router_flags: Sequence[str] = (),
) -> ServiceSpec:
    args = list(spec.args)
    if spec.name == "kvstore" and redis_prefix:
        args += ["--redis-prefix", redis_prefix]
    if spec.module in ("splitserve.prefill", "splitserve.decode"):
        args += list(worker_flags)
    if spec.name == "router":
        args += ["--health-interval", "0.5", *router_flags]
    return dataclasses.replace(spec, args=args, env={**spec.env, **env})


def wait_router_healthy(mesh: RunningMesh, timeout_s: float = 60.0) -> None:
    """The router's /health is 200 once it has seen a decode worker healthy."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            http_get(f"{mesh.http_url}/health")
            return
        time.sleep(0.2)
    raise TimeoutError(f"router /health never answered 200\n{mesh.tails()}")


def delete_redis_keys(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        batch = []
        for key in client.scan_iter(match=prefix + "*", count=500):
            batch.append(key)
            if len(batch) >= 500:
                client.delete(*batch)
                batch.clear()
        if batch:
            client.delete(*batch)
    finally:
        client.close()


# ---- HTTP and metrics -----------------------------------------------------------------------
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def http_get(url: str, timeout: float = 10.0, api_key: str | None = None) -> str:
    req = urllib.request.Request(url, headers=_headers(api_key))
    with _NO_PROXY.open(req, timeout=timeout) as resp:
        return resp.read().decode()


def http_post(
    url: str, body: bytes, timeout: float = 60.0, api_key: str | None = None
) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json", **_headers(api_key)}
    req = urllib.request.Request(url, data=body, headers=headers)
    try:
        with _NO_PROXY.open(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels` (0 if none)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    ]


def scrape(url: str, name: str, **labels: str) -> float:
    return metric_value(http_get(url), name, **labels)


# ---- no leaks -------------------------------------------------------------------------------
def idle_report(mesh: RunningMesh) -> list[str]:
    """What is still held anywhere in the mesh; [] when everything is back to its baseline."""
    problems = []
    for w in mesh.workers:
        load = mesh.load(w)
        if load.num_running or load.num_waiting or load.outstanding_tokens:
            problems.append(
                f"{w}: {load.num_running} running (incl. reserved), {load.num_waiting} waiting, "
                f"{load.outstanding_tokens} outstanding tokens"
            )
        if load.kv_usage != mesh.baseline_kv_usage[w]:
            problems.append(
                f"{w}: kv_usage {load.kv_usage} != baseline {mesh.baseline_kv_usage[w]}"
            )
        if w.startswith("prefill"):
            held = mesh.worker_metric(w, "kv_lease_bytes")
            if held:
                problems.append(f"{w}: {held:.0f} bytes still leased")
    text = mesh.router_metrics()
    if metric_value(text, "splitserve_router_requests_in_flight"):
        problems.append("router: requests still in flight")
    for name in ("worker_outstanding_tokens", "worker_outstanding_requests"):
        for labels, value in metric_samples(text, f"splitserve_router_{name}"):
            if value:
                problems.append(f"router: {name} {value} on {labels['worker']}")
    return problems


def assert_idle(mesh: RunningMesh, timeout_s: float = 30.0) -> None:
    """Every worker's KV, queue and leases, and the router's load counters, back to idle.

    Polls: the last stream's blocks and a released lease go back a moment after the client
    saw the final token.
    """
    deadline = time.monotonic() + timeout_s
    while problems := idle_report(mesh):
        if time.monotonic() > deadline:
            raise AssertionError("the mesh did not return to idle:\n" + "\n".join(problems))
        time.sleep(0.25)
    for w in mesh.workers_of("prefill"):  # nothing was left to expire: all pulled or released
        assert mesh.worker_metric(w, "kv_leases_expired_total") == 0, w
    for w in mesh.workers:  # no test walks away from a stream: none ended cancelled or failed
        for outcome in ("cancelled", "error"):
            assert mesh.worker_metric(w, "requests_total", outcome=outcome) == 0, (w, outcome)


# ---- the reference --------------------------------------------------------------------------
def chat_ids(tok: Tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The router's tokenization of chat messages (router/validation.py)."""
    return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), False)


def prompt_ids(tok: Tokenizer, text: str) -> list[int]:
    """The router's tokenization of a raw prompt: the model's special tokens added."""
    return tok.encode(text, add_special_tokens=True)


def greedy(engine: LLMEngine, prompts: Sequence[Sequence[int]], max_tokens: int) -> list[list[int]]:
    """The in-process engine's greedy tokens for each prompt, run as one batch.

    On one thread, like the workers: on a small shared machine torch's default (a thread per
    core, spinning at barriers) runs up to ten times slower whenever another process is busy.
    """
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [out.new_token_ids for out in engine.generate(list(prompts), params)]
    finally:
        torch.set_num_threads(threads)


def stream_ids(responses: Iterator[pb.GenerateResponse]) -> tuple[list[int], str, pb.Usage, int]:
    """(token ids, text, usage, finish reason) of a router Generate stream."""
    ids: list[int] = []
    text = ""
    usage = pb.Usage()
    finish = pb.FINISH_REASON_UNSPECIFIED
    for r in responses:
        ids += r.token_ids
        text += r.text
        if r.HasField("usage"):
            usage = r.usage
        finish = r.finish_reason or finish
    return ids, text, usage, finish
