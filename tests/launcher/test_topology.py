"""The deployment topology: who runs, on which port, with which flags, after whom."""

from __future__ import annotations

import argparse
import importlib
import importlib.util

import pytest

from splitserve.launcher import up
from splitserve.launcher.topology import COMPOSE, LOCAL, PortPlan, Secrets, ServiceSpec, Topology


def topology(*argv: str, placement=LOCAL) -> Topology:
    return Topology.from_args(up.build_parser().parse_args(list(argv)), placement)


def flag(spec: ServiceSpec, name: str) -> list[str]:
    """Every value given to `name` in the spec's args (repeatable flags give several)."""
    return [spec.args[i + 1] for i, a in enumerate(spec.args) if a == name]


def all_ports(t: Topology) -> list[int]:
    return [p for s in t.services for p in s.ports.values()]


def test_default_topology_follows_the_port_plan():
    t = topology()
    assert t.names == ["kvstore", "prefill-0", "decode-0", "router"]
    assert t.service("kvstore").ports == {"grpc": 50060}
    assert t.service("prefill-0").ports == {"grpc": 50070, "metrics": 9100}
    assert t.service("decode-0").ports == {"grpc": 50080, "metrics": 9101}
    assert t.router.ports == {"grpc": 50051, "http": 8000, "internal": 50052}
    assert all(flag(s, "--host") == ["127.0.0.1"] for s in t.services)  # loopback only
    assert flag(t.service("kvstore"), "--backend") == ["memory"]
    assert [s.name for s in t.services if s.public] == ["router"]


def test_workers_are_wired_to_kvstore_and_router():
    t = topology("--prefill", "2", "--decode", "3")
    kv = f"127.0.0.1:{t.service('kvstore').ports['grpc']}"
    for w in t.workers:
        assert flag(w, "--worker-id") == [w.name]
        assert flag(w, "--kvstore") == [kv]
        assert flag(w, "--port") == [str(w.ports["grpc"])]
        assert flag(w, "--metrics-port") == [str(w.ports["metrics"])]
        assert w.depends_on == ["kvstore"]
    prefill = [w for w in t.workers if w.module == "splitserve.prefill"]
    decode = [w for w in t.workers if w.module == "splitserve.decode"]
    assert [w.name for w in prefill] == ["prefill-0", "prefill-1"]
    assert [w.name for w in decode] == ["decode-0", "decode-1", "decode-2"]
    for w in prefill:
        assert flag(w, "--advertise-address") == [f"127.0.0.1:{w.ports['grpc']}"]
    assert all(flag(w, "--role") == ["decode"] for w in decode)
    assert flag(t.router, "--prefill") == [f"127.0.0.1:{w.ports['grpc']}" for w in prefill]
    assert flag(t.router, "--decode") == [f"127.0.0.1:{w.ports['grpc']}" for w in decode]
    assert t.router.depends_on == [w.name for w in t.workers]


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--prefill", "3", "--decode", "2"],
        ["--prefill", "12", "--decode", "12"],  # prefill 50070+i runs into decode's 50080
        ["--colocated", "--decode", "4"],
        ["--http-port", "50060", "--grpc-port", "9100"],  # router takes kvstore's and metrics'
        ["--port-offset", "1000", "--redis-url", "redis://127.0.0.1:50060/0"],
    ],
)
def test_ports_are_unique(argv):
    for placement in (LOCAL, COMPOSE):
        ports = all_ports(topology(*argv, placement=placement))
        assert len(ports) == len(set(ports)), ports


def test_port_offset_moves_internal_ports_only():
    t = topology("--port-offset", "1000")
    assert t.service("kvstore").ports["grpc"] == 51060
    assert t.service("prefill-0").ports == {"grpc": 51070, "metrics": 10100}
    assert t.router.ports == {"grpc": 50051, "http": 8000, "internal": 51052}


def test_colocated_has_no_prefill_pool():
    t = topology("--colocated", "--decode", "2")
    assert t.names == ["kvstore", "colocated-0", "colocated-1", "router"]
    assert not any(s.module == "splitserve.prefill" for s in t.services)
    assert all(flag(w, "--role") == ["colocated"] for w in t.workers)
    assert flag(t.router, "--prefill") == flag(t.router, "--decode") == []
    assert flag(t.router, "--colocated") == [f"127.0.0.1:{w.ports['grpc']}" for w in t.workers]


def test_redis_url_goes_to_kvstore_and_redis_is_not_launched():
    t = topology("--redis-url", "redis://127.0.0.1:6390/2")
    kv = t.service("kvstore")
    assert flag(kv, "--backend") == ["redis"]
    assert flag(kv, "--redis-url") == ["redis://127.0.0.1:6390/2"]
    assert kv.depends_on == ["redis"]
    redis = t.service("redis")
    assert not redis.launchable and redis.ports == {"redis": 6390}
    assert [s.name for s in t.services if s.launchable] == [
        "kvstore",
        "prefill-0",
        "decode-0",
        "router",
    ]


def test_engine_flags_reach_every_worker_and_the_router_agrees():
    t = topology(
        "--model", "/m/x.gguf", "--dtype", "bfloat16", "--kv-cache-mib", "64", "--block-size", "32",
        "--kv-cache-dtype", "int8", "--pipeline-stages", "2", "--stage-services",
    )  # fmt: skip
    t2 = topology("--no-prefix-caching", "--threads", "1")
    for w in t.workers:
        assert flag(w, "--model") == ["/m/x.gguf"]
        assert flag(w, "--dtype") == ["bfloat16"]
        assert flag(w, "--kv-cache-mib") == ["64"]
        assert flag(w, "--block-size") == ["32"]
    for w in [*t.workers, *t.stages]:  # every process that holds a part of the KV pool
        assert flag(w, "--kv-cache-dtype") == ["int8"]
    assert len(t.stages) == len(t.workers)
    for w in t2.workers:
        assert "--no-prefix-caching" in w.args and flag(w, "--threads") == ["1"]
        assert flag(w, "--model") == []  # the default model: no flag at all
    # The router hashes blocks itself: its keys only match with the workers' dtype and size.
    assert flag(t.router, "--kv-dtype") == ["bfloat16"]
    assert flag(t.router, "--kv-cache-dtype") == ["int8"]
    assert flag(t2.router, "--kv-cache-dtype") == ["auto"]
    assert flag(t.router, "--block-size") == ["32"]
    assert flag(t.router, "--model") == ["/m/x.gguf"]


def test_compose_placement_uses_service_names_and_binds_all_interfaces():
    t = topology(placement=COMPOSE)
    assert t.names == [
        *("secrets", "redis", "kvstore", "prefill-0", "decode-0", "router", "otel-collector")
    ]
    assert flag(t.service("kvstore"), "--redis-url") == ["redis://redis:6379/0"]
    assert flag(t.service("prefill-0"), "--kvstore") == ["kvstore:50060"]
    assert flag(t.service("prefill-0"), "--advertise-address") == ["prefill-0:50070"]
    assert flag(t.router, "--decode") == ["decode-0:50080"]
    assert all(flag(s, "--host") == ["0.0.0.0"] for s in t.services if s.launchable)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--colocated", "--prefill", "2"], "--colocated runs no prefill"),
        (["--decode", "0"], "at least one"),
        (["--prefill", "0"], "at least one"),
        (["--http-port", "7000", "--grpc-port", "7000"], "both 7000"),
        (["--port-offset", "20000"], "out of range"),
        (["--stage-services"], "needs --pipeline-stages 2"),
        (
            ["--pipeline-stages", "2", "--stage-services", "--pipeline-stage-addresses", "h:1"],
            "drop --pipeline-stage-addresses",
        ),
    ],
)
def test_bad_flags_are_refused(argv, message):
    with pytest.raises(ValueError, match=message):
        topology(*argv)


def test_port_plan_skips_taken_ports():
    plan = PortPlan([8000, 8001])
    assert [plan.take(8000), plan.take(8000), plan.take(9000)] == [8002, 8003, 9000]


# The flag names are a contract with the services' own parsers: once a service's entry point
# exists, every argument list the topology builds for it must parse there.
@pytest.mark.parametrize("package", ["kvstore", "prefill", "decode", "router"])
@pytest.mark.parametrize(
    "argv", [["--redis-url", "redis://127.0.0.1:6379/0"], ["--colocated", "--decode", "2"]]
)
def test_the_services_accept_the_topologys_flags(package, argv):
    if importlib.util.find_spec(f"splitserve.{package}.__main__") is None:
        pytest.skip(f"splitserve.{package}.__main__ isn't in yet")
    module = importlib.import_module(f"splitserve.{package}.__main__")
    locked = Topology.from_args(up.build_parser().parse_args(argv), LOCAL, Secrets("/s"))
    for t in (topology(*argv), locked, topology(*argv, placement=COMPOSE)):
        for spec in t.services:
            if spec.module == f"splitserve.{package}":
                parser = argparse.ArgumentParser(prog=spec.name, exit_on_error=False)
                module.add_arguments(parser)
                parser.parse_args(spec.args)  # raises on an unknown or malformed flag


def test_up_offers_exactly_the_routers_policies():
    if importlib.util.find_spec("splitserve.router.__main__") is None:
        pytest.skip("splitserve.router.__main__ isn't in yet")
    parser = argparse.ArgumentParser()
    importlib.import_module("splitserve.router.__main__").add_arguments(parser)
    (policy,) = [a for a in parser._actions if a.dest == "policy"]
    assert set(up.POLICIES) == set(policy.choices)


def test_up_and_compose_take_the_same_tp_pp_dp_settings():
    """TP and PP are engine flags every worker gets; DP is the replica count."""
    from splitserve.launcher.topology import render_compose

    argv = ("--prefill", "2", "--decode", "3", "--tensor-parallel-size", "2")
    argv += ("--pipeline-stages", "2", "--micro-batches", "4")
    local, compose = topology(*argv), topology(*argv, placement=COMPOSE)
    for t in (local, compose):
        assert [w.name for w in t.workers] == [
            "prefill-0",
            "prefill-1",
            "decode-0",
            "decode-1",
            "decode-2",
        ]
        for w in t.workers:
            assert flag(w, "--tensor-parallel-size") == ["2"]
            assert flag(w, "--pipeline-stages") == ["2"]
            assert flag(w, "--micro-batches") == ["4"]
    services = render_compose(compose)["services"]
    for w in compose.workers:
        command = services[w.name]["command"]
        assert command[command.index("--tensor-parallel-size") + 1] == "2"
        assert command[command.index("--pipeline-stages") + 1] == "2"


@pytest.mark.parametrize(
    "argv,cpus,short",
    [
        ((), 2, True),  # prefill + decode, torch's default of one thread per CPU each
        (("--colocated",), 2, True),  # one engine's threads on every core, the router beside
        (("--colocated", "--threads", "1"), 4, False),  # cores to spare: spin as long as usual
        (("--colocated", "--decode", "2", "--threads", "1"), 2, True),
        (("--colocated", "--decode", "2", "--threads", "1"), 8, False),
        (("--colocated", "--tensor-parallel-size", "2", "--threads", "1"), 2, True),
        (("--colocated", "--pipeline-stages", "2", "--threads", "2"), 8, False),
        (("--colocated", "--pipeline-stages", "2", "--threads", "2"), 2, True),
    ],
)
def test_workers_filling_the_cpus_spin_briefly(monkeypatch, argv, cpus, short):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: cpus)
    t = topology(*argv)
    for w in t.workers:
        assert (w.env.get("GOMP_SPINCOUNT") == "5000") is short, w.name
        assert "OMP_WAIT_POLICY" not in w.env  # passive waiting made every region a wake-up
    router = next(s for s in t.services if s.name == "router")
    assert "GOMP_SPINCOUNT" not in router.env
    # compose places services in containers this host doesn't size: left to the operator
    assert all("GOMP_SPINCOUNT" not in w.env for w in topology(*argv, placement=COMPOSE).workers)


@pytest.mark.parametrize(
    "argv,cpus,threads",
    [
        ((), 2, "1"),  # prefill + decode: a core each, not 2 threads each on 2 cores
        ((), 16, "8"),
        (("--prefill", "2", "--decode", "2"), 16, "4"),
        (("--prefill", "3", "--decode", "3"), 4, "1"),  # more processes than CPUs: 1 each
        (("--colocated", "--tensor-parallel-size", "2"), 8, "4"),  # each rank a process
        (("--colocated", "--decode", "2", "--pipeline-stages", "2"), 8, "2"),
        (("--colocated",), 2, None),  # one engine process: torch's default, every CPU
        (("--threads", "2"), 2, None),  # the operator's choice, passed as --threads
    ],
)
def test_engine_processes_share_the_hosts_cpus(monkeypatch, argv, cpus, threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: cpus)
    for w in topology(*argv).workers:
        assert w.env.get("OMP_NUM_THREADS") == threads, w.name
    router = next(s for s in topology(*argv).services if s.name == "router")
    assert "OMP_NUM_THREADS" not in router.env
    # compose places services in containers this host doesn't size: left to the operator
    assert all("OMP_NUM_THREADS" not in w.env for w in topology(*argv, placement=COMPOSE).workers)


def test_the_operators_own_omp_num_threads_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    t = topology()
    assert all("OMP_NUM_THREADS" not in w.env for w in t.workers)  # inherited as it is
    assert all(w.env.get("GOMP_SPINCOUNT") == "5000" for w in t.workers)  # 2 x 2 fill 2 CPUs


@pytest.mark.parametrize("var", ["OMP_WAIT_POLICY", "GOMP_SPINCOUNT"])
def test_the_users_own_openmp_waiting_wins(monkeypatch, var):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv(var, "ACTIVE" if var == "OMP_WAIT_POLICY" else "100")
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert all("GOMP_SPINCOUNT" not in w.env for w in topology().workers)


@pytest.mark.parametrize("placement", [LOCAL, COMPOSE])
def test_stage_services_are_their_workers_stages(placement):
    """`--stage-services`: every worker's stages 1..P-1 are services of their own, started
    before it, with its engine flags; the worker is pointed at them, in stage order."""
    from splitserve.executors.pipeline import stage as stage_main

    argv = ("--decode", "2", "--pipeline-stages", "3", "--stage-services", "--threads", "1")
    t = topology(*argv, placement=placement)
    workers = ["prefill-0", "decode-0", "decode-1"]
    stages = [f"{w}-stage-{k}" for w in workers for k in (1, 2)]
    splitserve = [n for n in t.names if n not in ("secrets", "redis", "otel-collector")]
    assert splitserve == ["kvstore", *stages, *workers, "router"]
    assert [s.name for s in t.stages] == stages and [w.name for w in t.workers] == workers
    assert [s.ports["grpc"] for s in t.stages] == list(range(50200, 50206))
    assert len(set(all_ports(t))) == len(all_ports(t))
    for w in t.workers:
        own = [s for s in t.stages if s.name.startswith(f"{w.name}-")]
        (addresses,) = flag(w, "--pipeline-stage-addresses")
        assert addresses.split(",") == [placement.address(s.name, s.ports["grpc"]) for s in own]
        assert set(w.depends_on) == {"kvstore", *(s.name for s in own)}
        for k, s in enumerate(own, start=1):
            assert flag(s, "--stage-index") == [str(k)]
            for engine_flag in ("--pipeline-stages", "--threads", "--kv-cache-mib", "--dtype"):
                assert flag(s, engine_flag) == flag(w, engine_flag), (s.name, engine_flag)
            assert flag(s, "--host") == [placement.bind_host]
            parser = argparse.ArgumentParser(prog=s.name, exit_on_error=False)
            stage_main.add_arguments(parser)
            parser.parse_args(s.args)  # the stage's own parser takes every flag
    # Without the flag, the workers start their stages themselves: no stage services.
    plain = topology(*(a for a in argv if a != "--stage-services"), placement=placement)
    assert plain.stages == []
    assert not any(flag(w, "--pipeline-stage-addresses") for w in plain.workers)


def test_compose_gives_each_stage_its_own_container():
    from splitserve.launcher.topology import render_compose

    t = topology("--colocated", "--pipeline-stages", "2", "--stage-services", placement=COMPOSE)
    services = render_compose(t)["services"]
    stage = services["colocated-0-stage-1"]
    assert stage["command"][:3] == ["python", "-m", "splitserve.executors.pipeline.stage"]
    assert stage["expose"] == ["50200"] and "ports" not in stage  # internal only
    assert stage["healthcheck"]["test"][4] == "127.0.0.1:50200"
    worker = services["colocated-0"]
    assert worker["depends_on"]["colocated-0-stage-1"] == {"condition": "service_healthy"}
    cmd = worker["command"]
    assert cmd[cmd.index("--pipeline-stage-addresses") + 1] == "colocated-0-stage-1:50200"


# ---- secrets --------------------------------------------------------------------------------
def locked(*argv: str, secrets_dir: str = "/run/x") -> Topology:
    """`up`'s topology as `up` builds it, with its secrets in `secrets_dir`."""
    return up.local_topology(up.build_parser().parse_args(list(argv)), secrets_dir)


def test_up_wires_tls_the_mesh_secret_and_the_api_key_by_default():
    t = locked("--pipeline-stages", "2", "--stage-services", "--prefill", "2")
    for spec in t.services:
        assert flag(spec, "--tls-cert") == [f"/run/x/{spec.name}.crt"], spec.name
        assert flag(spec, "--tls-key") == [f"/run/x/{spec.name}.key"], spec.name
        assert flag(spec, "--tls-ca") == ["/run/x/ca.crt"], spec.name
    for w in t.workers:
        assert flag(w, "--mesh-secret-file") == ["/run/x/mesh-secret"]
        # the router's internal port, never its public one
        assert flag(w, "--router") == [f"127.0.0.1:{t.router.ports['internal']}"]
    assert flag(t.router, "--api-key-file") == ["/run/x/api-keys"]
    assert flag(t.router, "--internal-port") == [str(t.router.ports["internal"])]
    assert t.router.probe == "internal"  # the launcher's health checks: mutual TLS too
    secret_values = [a for s in t.services for a in s.args if "sk-" in a]
    assert secret_values == []  # files only: argv is visible to every local user


def test_up_opt_outs():
    insecure = locked("--insecure")
    assert not any("--tls-cert" in s.args for s in insecure.services)
    assert flag(insecure.router, "--api-key-file") == ["/run/x/api-keys"]
    no_auth = locked("--no-auth")
    assert flag(no_auth.router, "--api-key-file") == []
    assert all(flag(s, "--tls-ca") == ["/run/x/ca.crt"] for s in no_auth.services)
    assert all(flag(w, "--mesh-secret-file") for w in no_auth.workers)  # signing stays on


@pytest.mark.parametrize("opt_out", ["--insecure", "--no-auth"])
def test_compose_has_no_opt_outs(opt_out):
    with pytest.raises(ValueError, match="for `up` on loopback"):
        topology(opt_out, placement=COMPOSE)
