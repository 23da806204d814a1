"""`splitserve up` as a user runs it: real processes, real signals, nothing left behind.

The process handling (startup order, health wait, a child dying and being restarted, a crash
loop, timeouts, SIGTERM then SIGKILL) is checked against tiny fake services that only speak
grpc.health.v1, in seconds; the end-to-end tests run the real mesh with the real model.
"""

from __future__ import annotations

import importlib.util
import json
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from ports import free_ports, up_args

from splitserve import cli
from splitserve.launcher import up
from splitserve.launcher.topology import Topology

FAKE_SERVICE = textwrap.dedent(
    """
    import argparse, os, signal, subprocess, sys, threading
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--exit-after", type=float, default=None)
    p.add_argument("--never-serve", action="store_true")
    p.add_argument("--ignore-term", action="store_true")
    p.add_argument("--crash-when", default=None, help="exit 3 once this file exists")
    p.add_argument("--crash-once", action="store_true", help="... removing it first")
    a = p.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, signal.SIG_IGN if a.ignore_term else lambda *_: stop.set())
    if a.ignore_term:  # a grandchild in our process group: must die with us
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    server = grpc.server(futures.ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{a.port}")
    server.start()
    print(f"fake listening on {a.port}", flush=True)
    status = "NOT_SERVING" if a.never_serve else "SERVING"
    servicer.set("", health_pb2.HealthCheckResponse.ServingStatus.Value(status))
    if a.crash_when:
        while not stop.wait(0.05) and not os.path.exists(a.crash_when):
            pass
    else:
        stop.wait(a.exit_after)
    if a.exit_after is not None or (a.crash_when and not stop.is_set()):
        if a.crash_once:
            os.remove(a.crash_when)
        print("fake crashing", flush=True)
        sys.exit(3)
    print("fake stopping", flush=True)
    server.stop(0)
    """
)

# Runs splitserve.launcher.up.serve() on a topology of fakes, in its own process (real signals).
DRIVER = textwrap.dedent(
    """
    import json, sys
    from splitserve.launcher import LaunchError
    from splitserve.launcher.up import serve
    from splitserve.launcher.supervisor import RestartPolicy
    from splitserve.launcher.topology import LOCAL, ServiceSpec, Topology

    cfg = json.loads(sys.argv[1])
    services = [
        ServiceSpec(
            name=s["name"], module="fake_service",
            args=["--port", str(s["ports"]["grpc"]), *s.get("extra", [])],
            ports=s["ports"], env={"PYTHONPATH": cfg["dir"]}, depends_on=s.get("deps", []),
        )
        for s in cfg["services"]
    ]
    try:
        rc = serve(
            Topology(services, LOCAL),
            timeout=cfg["timeout"],
            grace=cfg["grace"],
            log_dir=cfg.get("log_dir"),
            policy=RestartPolicy(backoff_s=(0.2, 0.4), max_restarts=cfg.get("max_restarts", 3)),
        )
    except LaunchError as exc:
        print(f"splitserve: error: {exc}", file=sys.stderr)
        rc = 2
    sys.exit(rc)
    """
)

STARTED = re.compile(r"splitserve: started (\S+) \(pid (\d+)\)")


# --- helpers ---------------------------------------------------------------------------------


def live_in_groups(pgids: set[int]) -> list[str]:
    """Processes (other than zombies) still in any of these process groups."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()  # after "(comm)": state ppid pgrp ...
        if int(fields[2]) in pgids and fields[0] != "Z":
            alive.append(text.split(")")[0] + ")")
    return alive


def started(output: str) -> dict[str, int]:
    return {name: int(pid) for name, pid in STARTED.findall(output)}


@pytest.fixture
def fakes(tmp_path: Path) -> Path:
    (tmp_path / "fake_service.py").write_text(FAKE_SERVICE)
    (tmp_path / "driver.py").write_text(DRIVER)
    return tmp_path


def mesh_config(fakes: Path, extra: dict[str, list[str]] | None = None, **kw) -> dict:
    """kvstore <- worker-0, worker-1 <- router, on free ports, as the real topology nests."""
    kv, w0, w1, grpc_port, http_port = free_ports(5)
    extra = extra or {}
    services = [
        {"name": "kvstore", "ports": {"grpc": kv}},
        {"name": "worker-0", "ports": {"grpc": w0}, "deps": ["kvstore"]},
        {"name": "worker-1", "ports": {"grpc": w1}, "deps": ["kvstore"]},
        {
            "name": "router",
            "ports": {"grpc": grpc_port, "http": http_port},
            "deps": ["worker-0", "worker-1"],
        },
    ]
    for s in services:
        s["extra"] = extra.get(s["name"], [])
    return {"dir": str(fakes), "services": services, "timeout": 30, "grace": 5, **kw}


def start_driver(fakes: Path, cfg: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(fakes / "driver.py"), json.dumps(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[str, str]:
    """The rest of the driver's output, after `read_until` (communicate() would skip what
    readline() already buffered)."""
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    try:
        assert proc.stdout is not None and proc.stderr is not None
        out, err = proc.stdout.read(), proc.stderr.read()
        proc.wait()
    finally:
        watchdog.cancel()
    return out, err


def read_until(proc: subprocess.Popen, marker: str, timeout: float = 30) -> str:
    """Reads stdout lines until one contains `marker` (the launcher flushes every line)."""
    seen = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if marker in line:
            return "".join(seen)
    proc.kill()
    raise AssertionError(f"no {marker!r} in:\n{''.join(seen)}")


# --- process handling, with fakes ------------------------------------------------------------


def test_up_waits_for_health_in_dependency_order_and_stops_on_sigterm(fakes):
    proc = start_driver(fakes, mesh_config(fakes))
    before = read_until(proc, "splitserve is up")
    proc.send_signal(signal.SIGTERM)
    out, err = finish(proc)
    assert proc.returncode == 0, err
    pids = started(before)
    names = list(pids)
    assert names[0] == "kvstore" and names[-1] == "router"
    assert set(names) == {"kvstore", "worker-0", "worker-1", "router"}
    assert out.count("fake stopping") == 4  # every child got SIGTERM and shut down itself
    # In waves, dependents first: the router drains while its workers still serve.
    stopped = [m.group(1) for m in re.finditer(r"^ *(\S+) \| fake stopping", out, re.MULTILINE)]
    assert stopped[0] == "router" and stopped[-1] == "kvstore", stopped
    assert live_in_groups(set(pids.values())) == []


def test_a_child_that_dies_is_restarted_and_the_mesh_serves_on(fakes, tmp_path):
    crash = tmp_path / "crash-worker-1"
    cfg = mesh_config(fakes, extra={"worker-1": ["--crash-when", str(crash), "--crash-once"]})
    proc = start_driver(fakes, cfg)
    before = read_until(proc, "splitserve is up")
    first = started(before)
    crash.touch()
    again = read_until(proc, "splitserve: worker-1 is serving again")
    proc.send_signal(signal.SIGTERM)
    out, err = finish(proc)
    assert proc.returncode == 0, err
    assert "worker-1 exited with status 3; restarting it in 0.2s" in err
    restarted = started(again)
    assert list(restarted) == ["worker-1"] and restarted["worker-1"] != first["worker-1"]
    assert "fake stopping" in out  # the rest never stopped, and stop cleanly at the end
    assert "worker-0 exited" not in err and "router exited" not in err
    assert live_in_groups({*first.values(), *restarted.values()}) == []


def test_a_crash_loop_stops_the_rest_and_exits_nonzero(fakes, tmp_path):
    crash = tmp_path / "crash-worker-1"
    cfg = mesh_config(fakes, extra={"worker-1": ["--crash-when", str(crash)]}, max_restarts=2)
    proc = start_driver(fakes, cfg)
    before = read_until(proc, "splitserve is up")
    crash.touch()  # from now on, every worker-1 exits as soon as it starts
    out, err = finish(proc)
    assert proc.returncode == 1
    assert err.count("worker-1 exited with status 3; restarting it in") == 2
    assert (
        "splitserve: error: worker-1 exited 3 times within 60s (last status 3); giving up; "
        "stopping the rest" in err
    )
    assert "fake crashing" in err  # its last log lines come with the message
    assert out.count("fake stopping") == 3  # the others were stopped in order
    assert live_in_groups(set(started(before + out).values())) == []


def test_restart_backoff_doubles_to_its_cap_and_resets_after_a_long_run():
    from splitserve.launcher.supervisor import RestartPolicy

    policy = RestartPolicy(backoff_s=(0.5, 10.0), window_s=60.0)
    delays, delay = [], None
    for _ in range(7):
        delay = policy.delay(delay, ran_s=1.0)
        delays.append(delay)
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert policy.delay(10.0, ran_s=61.0) == 0.5


def test_startup_timeout_names_the_service_and_shows_its_log(fakes):
    cfg = mesh_config(fakes, extra={"worker-0": ["--never-serve"]}, timeout=3)
    proc = start_driver(fakes, cfg)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert err.strip().splitlines()[-1] == (
        "splitserve: error: worker-0 did not report SERVING within 3s"
    )
    assert "--- last log lines of worker-0 ---" in err and "fake listening" in err
    assert "router" not in started(out)  # never started: its dependencies never came up
    assert live_in_groups(set(started(out).values())) == []


def test_stragglers_are_killed_with_their_whole_group(fakes):
    cfg = mesh_config(fakes, extra={"worker-0": ["--ignore-term"]}, grace=1)
    proc = start_driver(fakes, cfg)
    before = read_until(proc, "splitserve is up")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = finish(proc)
    assert proc.returncode == 0, err
    assert time.monotonic() - t0 < 10
    assert out.count("fake stopping") == 3  # worker-0 ignored SIGTERM and was killed
    assert live_in_groups(set(started(before).values())) == []


def test_log_dir_gets_one_file_per_service(fakes, tmp_path):
    cfg = mesh_config(fakes, log_dir=str(tmp_path / "logs"))
    proc = start_driver(fakes, cfg)
    before = read_until(proc, "splitserve is up")
    proc.send_signal(signal.SIGTERM)
    out, err = finish(proc)
    assert proc.returncode == 0, err
    assert f"logs           {tmp_path / 'logs'}/<service>.log" in before + out
    assert " | fake" not in before + out  # nothing of theirs on the terminal
    for name in ("kvstore", "worker-0", "worker-1", "router"):
        text = (tmp_path / "logs" / f"{name}.log").read_text()
        assert "fake listening" in text and "fake stopping" in text


# --- the real CLI ----------------------------------------------------------------------------


def test_service_commands_delegate_to_their_packages(capsys):
    for name in ("kvstore", "prefill", "decode", "router"):
        if importlib.util.find_spec(f"splitserve.{name}.__main__") is None:
            continue
        with pytest.raises(SystemExit) as exit_info:
            cli.main([name, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: splitserve {name}" in capsys.readouterr().out


def test_help_lists_up_and_the_services(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for name in ("generate", "bench", "up", "kvstore", "prefill", "decode", "router"):
        assert re.search(rf"^    {name} ", out, re.MULTILINE), name


def run_up(*argv: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "splitserve.cli", "up", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_a_taken_port_fails_in_one_line_before_starting_anything():
    argv = up_args()
    topology = Topology.from_args(up.build_parser().parse_args(argv))
    port = topology.service("kvstore").ports["grpc"]
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        proc = run_up(*argv, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"splitserve: error: port {port} (kvstore grpc) is already in use")
    assert started(proc.stdout) == {}


def services_exist() -> bool:
    pkgs = ("kvstore", "prefill", "decode", "router")
    return all(importlib.util.find_spec(f"splitserve.{p}.__main__") for p in pkgs)


needs_services = pytest.mark.skipif(
    not services_exist(), reason="the service entry points (splitserve.<svc>.__main__) aren't in"
)


@pytest.mark.slow
@needs_services
def test_up_demo_answers_and_leaves_no_process_behind(smollm2_path):
    argv = up_args("--demo", "--kv-cache-mib", "64", "--threads", "1", "--timeout", "400")
    proc = run_up(*argv, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    answer = re.search(r"^demo< (.+)$", proc.stdout, re.MULTILINE)
    assert answer and "Paris" in answer.group(1), proc.stdout[-3000:]
    pids = started(proc.stdout)
    assert set(pids) == {"kvstore", "prefill-0", "decode-0", "router"}
    assert live_in_groups(set(pids.values())) == []


@needs_services
def test_a_worker_that_cannot_start_stops_the_mesh(tmp_path):
    argv = up_args("--model", str(tmp_path / "missing.gguf"), "--timeout", "120")
    proc = run_up(*argv, timeout=300)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert re.match(r"splitserve: error: (prefill|decode)-0 exited with status \d+", last), last
    assert live_in_groups(set(started(proc.stdout).values())) == []
