"""The deployment as data: which services run, with which flags, ports and environment.

One `Topology` feeds both `splitserve up` (OS processes on loopback) and compose.yaml (one
container per service), so the two can't drift: they differ only in their `Placement`.

    kvstore ◄── prefill-0..N-1 ──┐
       ▲                         ├──► router (the only public service)
       └────── decode-0..M-1 ────┘    (or colocated-0..M-1 with --colocated)

With --pipeline-stages P each worker runs layers of stage 0 and starts stages 1..P-1 as its
own child processes; with --stage-services too, those stages are services of their own
(`<worker>-stage-<k>`, one container each under compose, so each can have its own device or
host) and the worker reaches them with --pipeline-stage-addresses.

The router lists every worker, and every worker also registers itself with the router's
internal port (`--router`; `up --no-register` turns that off), so a replica started later by
hand with `--router` joins the same pools (data parallelism).

Secrets (`Secrets`): with them every splitserve service gets `--tls-cert/--tls-key/--tls-ca`
(mutual TLS on every internal connection; its own certificate, named after the service), every
worker `--mesh-secret-file` (KV blocks are signed), the router `--api-key-file` (or, under
compose, SPLITSERVE_API_KEYS from the environment), and the kvstore Redis's password. `up`
writes them into a run directory (launcher/run_secrets.py); compose into a named volume, by a
one-shot `secrets` service that every other one waits for and mounts read-only.

Port plan (each shifted by --port-offset, skipping ports already taken by the plan):
router gRPC 50051 and HTTP 8000 (never shifted: they are the public face), router internal
50052 (the Registry), kvstore 50060, prefill 50070+i, decode 50080+i, worker metrics 9100+k
(prefill workers first), pipeline stage services 50200+j (worker by worker, stage by stage).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit

import yaml

from splitserve.launcher.certs import API_KEYS_FILE, MESH_SECRET_FILE, REDIS_PASSWORD_FILE

ROUTER_INTERNAL_PORT = 50052
KVSTORE_PORT = 50060
PREFILL_PORT = 50070
DECODE_PORT = 50080
METRICS_PORT = 9100
STAGE_PORT = 50200
STAGE_MODULE = "splitserve.executors.pipeline.stage"
ROUTER_GRPC_PORT = 50051
ROUTER_HTTP_PORT = 8000
COMPOSE_REDIS_URL = "redis://redis:6379/0"
IMAGE = "splitserve:0.1.0"
OTEL_COLLECTOR_IMAGE = "otel/opentelemetry-collector:0.111.0"
REDIS_COMMAND = [
    "redis-server",
    *("--maxmemory", "1gb", "--maxmemory-policy", "allkeys-lru"),
    # A KV cache is recomputable: persistence would only cost latency and disk.
    *("--save", "", "--appendonly", "no"),
]
COMPOSE_HEADER = (
    "# Generated from launcher/topology.py by `splitserve up --print-compose`; do not edit.\n"
    "# Every internal connection is mutual TLS (certificates made by the `secrets` service into\n"
    "# the `secrets` volume) and the router asks clients for one of SPLITSERVE_API_KEYS:\n"
    "# SPLITSERVE_API_KEYS=sk-... docker compose up --build   # router on :8000 (HTTP), :50051\n"
    "# SPLITSERVE_OTEL_EXPORTER=otlp docker compose --profile otel up --build   # with tracing\n"
)
# Exits 0 only if the gRPC server at argv[1] answers grpc.health.v1 with SERVING; with
# argv[2:5] = certificate, key and CA, over mutual TLS.
GRPC_PROBE = (
    "import sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; "
    "f = [open(p, 'rb').read() for p in sys.argv[2:5]]; "
    "c = grpc.secure_channel(sys.argv[1], grpc.ssl_channel_credentials(f[2], f[1], f[0])) "
    "if f else grpc.insecure_channel(sys.argv[1]); "
    "r = g.HealthStub(c).Check(h.HealthCheckRequest(), timeout=3); "
    "sys.exit(r.status != h.HealthCheckResponse.SERVING)"
)
TLS_FLAGS = ("--tls-cert", "--tls-key", "--tls-ca")  # in that order in every command
PUBLIC_PORTS = ("grpc", "http")  # the router's; its "internal" port is only exposed
SECRETS_VOLUME = "secrets"
SECRETS_MOUNT = "/secrets"  # in the image, owned by its user (Dockerfile)
API_KEYS_ENV = (
    "${SPLITSERVE_API_KEYS:?set SPLITSERVE_API_KEYS to the API keys clients must send, "
    "comma-separated}"
)


@dataclass(frozen=True)
class Placement:
    """Where the services run: one host's loopback, or one container each on a network."""

    bind_host: str
    by_name: bool  # peers reach a service by its name (container DNS), not by bind_host
    env: dict[str, str] = field(default_factory=dict)

    def address(self, service: str, port: int) -> str:
        return f"{service if self.by_name else self.bind_host}:{port}"


LOCAL = Placement(bind_host="127.0.0.1", by_name=False)
COMPOSE = Placement(
    bind_host="0.0.0.0",  # inside its container; only the router's ports are published
    by_name=True,
    env={
        # Tracing stays off unless the otel profile is up and the exporter is switched on.
        "SPLITSERVE_OTEL_EXPORTER": "${SPLITSERVE_OTEL_EXPORTER:-none}",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector:4317",
    },
)


@dataclass(frozen=True)
class Secrets:
    """Where the services read their secrets, and which of them are used (see the docstring).
    File names are `splitserve certs`'s: NAME.crt/.key per service, ca.crt, mesh-secret,
    api-keys, redis-password."""

    dir: str
    tls: bool = True  # mutual TLS on the internal plane; False: plaintext (loopback only)
    api_key_file: bool = True  # the router's keys from DIR/api-keys; False: none, or compose's env
    redis_password: bool = False  # Redis AUTH from DIR/redis-password (the compose Redis)

    def file(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def tls_args(self, service: str) -> list[str]:
        if not self.tls:
            return []
        cert, key = self.file(f"{service}.crt"), self.file(f"{service}.key")
        return ["--tls-cert", cert, "--tls-key", key, "--tls-ca", self.file("ca.crt")]


COMPOSE_SECRETS = Secrets(SECRETS_MOUNT, api_key_file=False, redis_password=True)


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    module: str | None  # run as `python -m module`; None: a third-party image (redis, otel)
    args: list[str]  # after `python -m module`, or the image's whole command
    ports: dict[str, int]  # role ("grpc", "http", "metrics", "redis", ...) -> port
    env: dict[str, str] = field(default_factory=dict)
    depends_on: list[str] = field(default_factory=list)
    public: bool = False  # reachable from outside (compose publishes its ports)
    image: str | None = None
    profiles: list[str] = field(default_factory=list)  # compose profiles; [] = always on
    probe: str = "grpc"  # the port whose grpc.health.v1 says whether it is up
    healthcheck: list[str] = field(default_factory=list)  # compose's test, if not the default
    secrets: bool = False  # mounts the secrets volume (compose)
    oneshot: bool = False  # runs to completion before the others start (compose)

    @property
    def launchable(self) -> bool:
        """`splitserve up` runs it; redis, the collector and compose's secrets maker aren't."""
        return self.module is not None and not self.oneshot

    def argv(self, python: str = sys.executable) -> list[str]:
        if self.module is None:
            return list(self.args)
        return [python, "-m", self.module, *self.args]


@dataclass(frozen=True)
class Topology:
    services: list[ServiceSpec]  # in start order: every service after what it depends on
    placement: Placement
    secrets: Secrets | None = None  # None: plaintext on loopback, no API key

    @classmethod
    def from_args(
        cls,
        args: argparse.Namespace,
        placement: Placement = LOCAL,
        secrets: Secrets | None = None,
    ) -> Topology:
        """Build from `splitserve up`'s parsed flags (splitserve.launcher.up.build_parser).
        Compose always has its secrets (COMPOSE_SECRETS); locally they are the caller's to
        write."""
        if placement is COMPOSE:
            secrets = secrets or COMPOSE_SECRETS
        return _build(args, placement, secrets)

    def service(self, name: str) -> ServiceSpec:
        for spec in self.services:
            if spec.name == name:
                return spec
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.services]

    @property
    def router(self) -> ServiceSpec:
        return self.service("router")

    @property
    def workers(self) -> list[ServiceSpec]:
        return [s for s in self.services if s.module in ("splitserve.prefill", "splitserve.decode")]

    @property
    def stages(self) -> list[ServiceSpec]:
        """Pipeline stages run as services of their own (`--stage-services`)."""
        return [s for s in self.services if s.module == STAGE_MODULE]


class PortPlan:
    """Hands out each preferred port, or the next free one, so no two services share one."""

    def __init__(self, reserved: Iterable[int]) -> None:
        self.used = set(reserved)

    def take(self, preferred: int) -> int:
        port = preferred
        while port in self.used:
            port += 1
        if not 0 < port < 65536:
            raise ValueError(f"port {port} is out of range; lower --port-offset")
        self.used.add(port)
        return port


def engine_argv(args: argparse.Namespace) -> list[str]:
    """Every engine flag `up` was given (defaults included), in the workers' own spelling."""
    from splitserve.executors.flags import add_engine_args

    parser = argparse.ArgumentParser(add_help=False)
    add_engine_args(parser)
    argv: list[str] = []
    for action in parser._actions:  # the engine flags' one definition, so none is forgotten
        value = getattr(args, action.dest)
        if isinstance(action, argparse._StoreTrueAction):
            argv += [action.option_strings[0]] if value else []
        elif value is not None:
            argv += [action.option_strings[0], str(value)]
    return argv


def _validate(args: argparse.Namespace, placement: Placement) -> None:
    if args.colocated and args.prefill is not None:
        raise ValueError("--colocated runs no prefill workers; drop --prefill")
    if (args.prefill is not None and args.prefill < 1) or args.decode < 1:
        raise ValueError("--prefill and --decode need at least one worker each")
    if args.http_port == args.grpc_port:
        raise ValueError(f"--http-port and --grpc-port are both {args.http_port}")
    opted_out = getattr(args, "insecure", False) or getattr(args, "no_auth", False)
    if placement is COMPOSE and opted_out:
        raise ValueError("--insecure and --no-auth are for `up` on loopback; compose services "
                         "talk over a network and the router is published")  # fmt: skip
    if args.stage_services:
        if args.pipeline_stages < 2:
            raise ValueError("--stage-services needs --pipeline-stages 2 or more")
        if args.pipeline_stage_addresses:
            raise ValueError("--stage-services places the stages itself; drop "
                             "--pipeline-stage-addresses")  # fmt: skip


def _build(args: argparse.Namespace, placement: Placement, secrets: Secrets | None) -> Topology:
    _validate(args, placement)
    redis_url = args.redis_url or (COMPOSE_REDIS_URL if placement is COMPOSE else None)
    own_redis = placement is COMPOSE and not args.redis_url  # compose runs it: ours to lock
    redis = _redis(redis_url, secrets if own_redis else None) if redis_url else None
    builder = _Builder(args, placement, secrets, reserved=redis.ports.values() if redis else ())
    kvstore = builder.kvstore(redis_url, own_redis)
    workers = builder.workers(kv_address=placement.address(kvstore.name, kvstore.ports["grpc"]))
    stages = {w.name: builder.stages(w) for w in workers}  # [] unless --stage-services
    wired = [builder.wired_to_stages(w, stages[w.name]) for w in workers]
    services = [*([redis] if redis else []), kvstore, *(s for w in wired for s in stages[w.name])]
    services += [*wired, builder.router(wired)]
    if placement is COMPOSE:
        services = [_secrets_maker(services, secrets), *services, _otel_collector()]
    return Topology(services=services, placement=placement, secrets=secrets)


class _Builder:
    """The splitserve services' specs, sharing one port plan, placement and flag set."""

    def __init__(
        self,
        args: argparse.Namespace,
        placement: Placement,
        secrets: Secrets | None,
        reserved: Iterable[int],
    ):
        self.args = args
        self.placement = placement
        self.secrets = secrets
        self.plan = PortPlan([args.http_port, args.grpc_port, *reserved])
        self.internal_port = self._port(ROUTER_INTERNAL_PORT)
        # Unbuffered, so log lines reach the launcher (and `docker logs`) as they happen.
        self.env = {"PYTHONUNBUFFERED": "1", **placement.env}

    def _port(self, base: int) -> int:
        return self.plan.take(base + self.args.port_offset)

    def _common(self, name: str, port: int) -> list[str]:
        host, level = self.placement.bind_host, self.args.log_level
        return ["--host", host, "--port", str(port), "--log-level", level, *self._tls(name)]

    def _tls(self, name: str) -> list[str]:
        return self.secrets.tls_args(name) if self.secrets else []

    def _spec(self, **kw) -> ServiceSpec:
        return ServiceSpec(secrets=self.secrets is not None, **kw)

    def kvstore(self, redis_url: str | None, own_redis: bool) -> ServiceSpec:
        port = self._port(KVSTORE_PORT)
        backend = ["--backend", "redis", "--redis-url", redis_url] if redis_url else []
        if own_redis and self.secrets and self.secrets.redis_password:
            backend += ["--redis-password-file", self.secrets.file(REDIS_PASSWORD_FILE)]
        return self._spec(
            name="kvstore",
            module="splitserve.kvstore",
            args=[*self._common("kvstore", port), *(backend or ["--backend", "memory"])],
            ports={"grpc": port},
            env=self.env,
            depends_on=["redis"] if redis_url else [],
        )

    def workers(self, kv_address: str) -> list[ServiceSpec]:
        """prefill-0..N-1 then decode-0..M-1 (or colocated-0..M-1); metrics ports in that order."""
        args = self.args
        decode_role = "colocated" if args.colocated else "decode"
        num_prefill = 0 if args.colocated else (args.prefill or 1)
        slots = [("prefill", i, self._port(PREFILL_PORT + i)) for i in range(num_prefill)]
        slots += [(decode_role, i, self._port(DECODE_PORT + i)) for i in range(args.decode)]
        metrics = [self._port(METRICS_PORT + k) for k in range(len(slots))]
        shared = engine_argv(args)
        env = {**self.env, **self._omp_env(len(slots))}
        return [
            self._worker(f"{role}-{i}", role, port, metrics[k], kv_address, shared, env)
            for k, (role, i, port) in enumerate(slots)
        ]

    def stages(self, worker: ServiceSpec) -> list[ServiceSpec]:
        """With --stage-services: the worker's stages 1..P-1, each a service of its own with
        the worker's engine flags (so the same layer split and KV pool)."""
        if not self.args.stage_services:
            return []
        engine = engine_argv(self.args)
        out = []
        for k in range(1, self.args.pipeline_stages):
            port = self._port(STAGE_PORT)  # the plan hands out the next free one
            name = f"{worker.name}-stage-{k}"
            out.append(
                self._spec(
                    name=name,
                    module=STAGE_MODULE,
                    args=[*self._common(name, port), "--stage-index", str(k), *engine],
                    ports={"grpc": port},
                    env=worker.env,
                )
            )
        return out

    def wired_to_stages(self, worker: ServiceSpec, stages: list[ServiceSpec]) -> ServiceSpec:
        """The worker, pointed at its stage services (in stage order) and started after them."""
        if not stages:
            return worker
        addresses = ",".join(self.placement.address(s.name, s.ports["grpc"]) for s in stages)
        return replace(
            worker,
            args=[*worker.args, "--pipeline-stage-addresses", addresses],
            depends_on=[*worker.depends_on, *(s.name for s in stages)],
        )

    def _omp_env(self, num_workers: int) -> dict[str, str]:
        """How the engine processes on this host share its CPUs: OMP_NUM_THREADS and
        GOMP_SPINCOUNT for every worker (each TP rank and pipeline stage is one process).

        Threads. Without --threads, each engine process gets an equal share of the CPUs
        (OMP_NUM_THREADS = CPUs // processes, at least 1) instead of torch's default of one
        thread per CPU each. Two workers of 2 threads on 2 cores keep 4 OpenMP threads on 2
        cores, and a parallel region waits whenever the OS took one of its threads off a core:
        measured on a 2-vCPU AMD EPYC, `bench serve` random 256/128 under blocks-int8, a
        disaggregated mesh at 32 concurrent did 163-164 output tok/s with 2 + 2 threads and
        215 with 1 + 1, its prefill steps 1,079-1,145 ms against 737 (docs/benchmarks.md).
        One process keeps torch's default; --threads (per engine process) wins, and so does
        the operator's own OMP_NUM_THREADS.

        Spinning. GOMP_SPINCOUNT=5000 when this host's engine threads fill its CPUs, which
        the router (and the clients of a benchmark) share with them. OpenMP threads
        spin-wait for the next parallel region, by default for ~300,000 spins (a millisecond
        or more): right for an engine that owns its cores, costly for one that shares them.
        Between two steps the spinning threads hold the cores the router needs to stream the
        last token, and a step's parallel region waits for a thread the OS took off its core.
        A decode step of the int8 path is ~150 regions tens of microseconds apart, so a short
        spin still bridges them, and the threads sleep between steps. Measured on 2 noisy
        cores, `bench serve` random 128/64 under blocks-int8, one run each: colocated 78 ->
        130 tok/s at c=1, 201 -> 294 at c=8, 263 -> 386 at c=32; disaggregated (4 threads on
        2 cores) 73 -> 128 tok/s at c=1 and 166 -> 169 at c=8 against
        OMP_WAIT_POLICY=PASSIVE, which this replaced (passive threads sleep after every
        region: a batch-1 step went from 4.6 to 16 ms). Never overrides the operator's own
        OMP_WAIT_POLICY or GOMP_SPINCOUNT.

        Only for processes on this host: compose and Kubernetes size their containers."""
        args = self.args
        if self.placement.by_name:
            return {}
        cpus = os.cpu_count() or 1
        processes = num_workers * args.tensor_parallel_size * args.pipeline_stages
        env: dict[str, str] = {}
        own = os.environ.get("OMP_NUM_THREADS")
        per_process = args.threads or (int(own) if own and own.isdigit() and int(own) > 0 else None)
        if per_process is None:
            per_process = max(1, cpus // processes)  # one process: every CPU, torch's default
            if processes > 1 and own is None:
                env["OMP_NUM_THREADS"] = str(per_process)
        spin_set = {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(os.environ)
        if not spin_set and processes * per_process >= cpus:
            env["GOMP_SPINCOUNT"] = "5000"
        return env

    def _worker(
        self,
        name: str,
        role: str,
        port: int,
        metrics_port: int,
        kv_address: str,
        engine: list[str],
        env: dict[str, str],
    ) -> ServiceSpec:
        # Decode workers pull a prefill's KV from the address it advertises, and the router
        # dials whatever address a worker registers with: advertise how peers reach it.
        advertise = ["--advertise-address", self.placement.address(name, port)]
        if role == "prefill":
            own = ["--worker-id", name, *advertise]
        else:
            own = ["--role", role, "--worker-id", name]
        if self.args.register:
            # Workers also join the router's pool themselves (it lists them too, so that is
            # idempotent) and leave it first on SIGTERM. The router starts after them: they
            # retry until it answers.
            router = self.placement.address("router", self.internal_port)
            own += ["--router", router, *(advertise if role != "prefill" else [])]
        if self.secrets:
            own += ["--mesh-secret-file", self.secrets.file(MESH_SECRET_FILE)]
        return self._spec(
            name=name,
            module="splitserve.prefill" if role == "prefill" else "splitserve.decode",
            args=[
                *self._common(name, port),
                *own,
                *("--kvstore", kv_address, "--metrics-port", str(metrics_port)),
                *engine,
            ],
            ports={"grpc": port, "metrics": metrics_port},
            env=env,
            depends_on=["kvstore"],
        )

    def router(self, workers: list[ServiceSpec]) -> ServiceSpec:
        args = self.args
        pools: list[str] = []
        for w in workers:
            pool = w.name.rsplit("-", 1)[0]  # prefill, decode or colocated: the router's flag
            pools += [f"--{pool}", self.placement.address(w.name, w.ports["grpc"])]
        # The router hashes prompt blocks itself, so its block size and KV dtype must be the
        # workers': otherwise no key it computes would ever hit their caches.
        keys, env = [], self.env
        if self.secrets and self.secrets.api_key_file:
            keys = ["--api-key-file", self.secrets.file(API_KEYS_FILE)]
        elif self.placement is COMPOSE:
            env = {**env, "SPLITSERVE_API_KEYS": API_KEYS_ENV}
        return self._spec(
            name="router",
            module="splitserve.router",
            args=[
                *("--host", self.placement.bind_host),
                *("--grpc-port", str(args.grpc_port), "--http-port", str(args.http_port)),
                *("--internal-port", str(self.internal_port), *self._tls("router"), *keys),
                *(["--model", args.model] if args.model else []),
                *pools,
                *("--policy", args.policy, "--kv-dtype", args.dtype),
                *("--kv-cache-dtype", args.kv_cache_dtype),
                *("--block-size", str(args.block_size), "--log-level", args.log_level),
            ],
            ports={"grpc": args.grpc_port, "http": args.http_port, "internal": self.internal_port},
            env=env,
            depends_on=[w.name for w in workers],
            public=True,
            probe="internal",
        )


def _redis(url: str, secrets: Secrets | None) -> ServiceSpec:
    """Redis as a service (compose): with `secrets`, it asks for the password in the volume,
    read into a config file only Redis can read (never on a command line)."""
    port = urlsplit(url).port or 6379
    command = [*REDIS_COMMAND, *(["--port", str(port)] if port != 6379 else [])]
    probe = ["CMD", "redis-cli", "-p", str(port), "ping"]
    if secrets is not None and secrets.redis_password:
        password = secrets.file(REDIS_PASSWORD_FILE)
        # Runs as root in the redis image; its entrypoint then drops to the redis user.
        command = ["sh", "-c", (
            f"umask 077 && printf 'requirepass %s\\n' \"$$(cat {password})\" > /tmp/redis.conf && "
            "chown redis /tmp/redis.conf && exec docker-entrypoint.sh redis-server "
            f"/tmp/redis.conf {shlex.join(command[1:])}"
        )]  # fmt: skip
        probe = ["CMD-SHELL", f"REDISCLI_AUTH=\"$$(cat {password})\" redis-cli -p {port} ping "
                 "| grep -q PONG"]  # fmt: skip
    return ServiceSpec(
        name="redis",
        module=None,
        image="redis:7",
        args=command,
        ports={"redis": port},
        healthcheck=probe,
        secrets=secrets is not None,
    )


def _secrets_maker(services: list[ServiceSpec], secrets: Secrets | None) -> ServiceSpec:
    """Compose's one-shot `secrets`: certificates for every splitserve service, the mesh secret
    and Redis's password, into the volume; a second run keeps what is there."""
    assert secrets is not None
    names = [s.name for s in services if s.launchable]
    return ServiceSpec(
        name="secrets",
        module="splitserve.cli",
        args=[
            *("certs", "--out", secrets.dir),
            *(a for name in names for a in ("--service", name)),
            *("--mesh-secret", "--redis-password"),
        ],
        ports={},
        env={"PYTHONUNBUFFERED": "1"},
        oneshot=True,
        secrets=True,
    )


def _otel_collector() -> ServiceSpec:
    return ServiceSpec(
        name="otel-collector",
        module=None,
        image=OTEL_COLLECTOR_IMAGE,
        args=[],  # the image's default config: OTLP in on 4317/4318, spans to its log
        ports={"otlp-grpc": 4317, "otlp-http": 4318},
        profiles=["otel"],
    )


# --- compose ---------------------------------------------------------------------------------


def render_compose(topology: Topology) -> dict:
    """The compose file for a topology built with the COMPOSE placement."""
    if topology.placement is not COMPOSE:
        raise ValueError("render_compose needs a topology built with placement=COMPOSE")
    oneshots = [s.name for s in topology.services if s.oneshot]
    out = {
        "name": "splitserve",
        "services": {s.name: _compose_service(s, oneshots) for s in topology.services},
    }
    if any(s.secrets for s in topology.services):
        out["volumes"] = {SECRETS_VOLUME: {}}
    return out


class _ComposeDumper(yaml.SafeDumper):
    """Lists of short values on one (wrapped) line: a command reads as a command."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(isinstance(x, str | int) and len(str(x)) < 40 for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_ComposeDumper.add_representer(list, _represent_list)


def render_compose_yaml(topology: Topology) -> str:
    body = yaml.dump(render_compose(topology), Dumper=_ComposeDumper, sort_keys=False, width=80)
    return COMPOSE_HEADER + body


def _compose_service(spec: ServiceSpec, oneshots: list[str]) -> dict:
    out: dict = {}
    if spec.profiles:
        out["profiles"] = list(spec.profiles)
    if spec.module is None:
        out["image"] = spec.image
    else:
        out["image"] = IMAGE
        out["build"] = "."
    if spec.args:
        out["command"] = spec.argv(python="python")
    if spec.env:
        out["environment"] = dict(spec.env)
    published = [p for role, p in spec.ports.items() if spec.public and role in PUBLIC_PORTS]
    if published:
        out["ports"] = [f"{p}:{p}" for p in published]
    exposed = [str(p) for p in spec.ports.values() if p not in published]
    if exposed:
        out["expose"] = exposed
    if spec.secrets:
        mode = "" if spec.oneshot else ":ro"  # only the maker writes
        out["volumes"] = [f"{SECRETS_VOLUME}:{SECRETS_MOUNT}{mode}"]
    probe = _probe(spec)
    if probe:
        out["healthcheck"] = {
            "test": probe,
            "interval": "5s",
            "timeout": "5s",
            "retries": 5,
            # Loading weights on a small CPU box takes a while; Redis is up at once.
            "start_period": "180s" if spec.module else "10s",
        }
    after = {d: {"condition": "service_completed_successfully"} for d in oneshots}
    after = after if spec.secrets and not spec.oneshot else {}
    after.update({d: {"condition": "service_healthy"} for d in spec.depends_on})
    if after:
        out["depends_on"] = after
    if spec.launchable:
        out["stop_grace_period"] = _stop_grace(spec)
    return out


def _stop_grace(spec: ServiceSpec) -> str:
    """Past the service's own drain: the router's 30 s, which covers the workers' (25 s, and
    they get SIGTERM after the router has stopped: compose stops dependents first)."""
    return "45s" if spec.public else "35s"


def _probe(spec: ServiceSpec) -> list[str] | None:
    if spec.healthcheck:
        return list(spec.healthcheck)
    if spec.probe in spec.ports:
        tls = [spec.args[i + 1] for i, a in enumerate(spec.args) if a in TLS_FLAGS]
        return ["CMD", "python", "-c", GRPC_PROBE, f"127.0.0.1:{spec.ports[spec.probe]}", *tls]
    if "redis" in spec.ports:
        return ["CMD", "redis-cli", "-p", str(spec.ports["redis"]), "ping"]
    return None
