"""`splitserve up`: the whole mesh as OS processes on this machine, in one terminal.

Starts every launchable service of the topology (kvstore, prefill, decode, router; see
topology.py) under supervisor.py's supervision, prints the endpoints once all report SERVING, and
stops everything on Ctrl-C / SIGTERM (exit 0; a second Ctrl-C skips the drain). A child that
dies while up is restarted; a crash loop stops the rest (exit 1); a startup failure is one line
(exit 2).

By default the mesh is locked: a fresh private run directory (removed on exit; --secrets-dir
keeps one) gets a CA and a certificate per service, so every internal connection is mutual
TLS; a mesh secret that signs KV blocks; and an API key the router asks every client for,
printed in the banner. `--insecure` (plaintext internal plane, loopback only) and `--no-auth`
(no API key) opt out.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

from splitserve.launcher import LaunchError
from splitserve.launcher.supervisor import GRACE_SECONDS, Console, Mesh, RestartPolicy, StartupError
from splitserve.launcher.topology import COMPOSE, LOCAL, Secrets, Topology, render_compose_yaml

DEMO_PROMPT = "What is the capital of France?"
POLICIES = ("prefix_aware", "round_robin", "least_tokens")


def build_parser() -> argparse.ArgumentParser:
    """`up`'s flags alone (tests and Topology.from_args callers)."""
    p = argparse.ArgumentParser(prog="splitserve up")
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    from splitserve.executors.flags import add_engine_args

    g = p.add_argument_group("mesh")
    g.add_argument("--prefill", type=int, default=None, metavar="N", help="prefill workers (1)")
    g.add_argument("--decode", type=int, default=1, metavar="M", help="decode workers (1)")
    g.add_argument(
        "--colocated",
        action="store_true",
        help="M colocated workers (prefill and decode in one) instead of the two pools",
    )
    g.add_argument(
        "--no-register",
        dest="register",
        action="store_false",
        help="workers don't register with the router (it still knows them from its flags); by "
        "default each passes --router, joins the pool once serving and leaves it on SIGTERM",
    )
    g.add_argument(
        "--stage-services",
        action="store_true",
        help="with --pipeline-stages P: run each worker's stages 1..P-1 as services of their "
        "own (one container each with --print-compose), which the worker reaches with "
        "--pipeline-stage-addresses; default: the worker starts them as its child processes",
    )
    g.add_argument(
        "--redis-url",
        default=None,
        help="kvstore keeps blocks in this Redis (yours to run); default: in memory",
    )
    g.add_argument("--policy", default="prefix_aware", choices=POLICIES, help="routing policy")
    g.add_argument("--http-port", type=int, default=8000, help="router HTTP (OpenAI) port")
    g.add_argument("--grpc-port", type=int, default=50051, help="router gRPC port")
    g.add_argument(
        "--port-offset",
        type=int,
        default=0,
        help="shift every internal port (kvstore, workers, metrics) by this much, to run two "
        "meshes side by side",
    )
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    g.add_argument("--log-dir", default=None, help="write each service's log to DIR/NAME.log")
    g.add_argument("--timeout", type=float, default=180.0, help="startup timeout, seconds")
    g.add_argument(
        "--demo",
        action="store_true",
        help="send one chat completion once up, print the answer, then stop everything",
    )
    sec = p.add_argument_group("security (by default: mutual TLS inside, an API key outside)")
    sec.add_argument(
        "--secrets-dir",
        default=None,
        metavar="DIR",
        help="keep the certificates, mesh secret and API key here, and reuse them next time "
        "(default: a private temporary directory, removed on exit)",
    )
    sec.add_argument("--api-key", default=None, help="the key clients send (default: a new one)")
    sec.add_argument("--no-auth", action="store_true", help="the router asks for no API key")
    sec.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext gRPC between the services (they are on loopback) instead of mutual TLS",
    )
    g.add_argument(
        "--print-compose",
        action="store_true",
        help="print the compose file for these flags (Redis backend, container hostnames); "
        "start nothing",
    )
    add_engine_args(p)


def run(args: argparse.Namespace) -> int:
    if args.print_compose:
        sys.stdout.write(render_compose_yaml(Topology.from_args(args, COMPOSE)))
        return 0
    from splitserve.launcher.run_secrets import write_secrets

    check_api_key(args)
    run_dir = args.secrets_dir or tempfile.mkdtemp(prefix="splitserve-up-")  # 0700
    try:
        topology = local_topology(args, run_dir)
        api_key = write_secrets(topology, args.api_key)
        return serve(
            topology,
            timeout=args.timeout,
            demo=args.demo,
            log_dir=args.log_dir,
            api_key=api_key,
        )
    finally:
        if not args.secrets_dir:
            shutil.rmtree(run_dir, ignore_errors=True)


def local_topology(args: argparse.Namespace, secrets_dir: str) -> Topology:
    """`up`'s topology, its secrets in `secrets_dir` (which `write_secrets` then fills)."""
    secrets = Secrets(secrets_dir, tls=not args.insecure, api_key_file=not args.no_auth)
    return Topology.from_args(args, LOCAL, secrets)


def check_api_key(args: argparse.Namespace) -> None:
    if args.api_key is not None and not re.fullmatch(r"[\x21-\x7e]{8,256}", args.api_key):
        raise LaunchError("--api-key must be 8-256 printable characters, without spaces")
    if args.api_key is not None and args.no_auth:
        raise LaunchError("--api-key and --no-auth contradict each other")


# --- serve -----------------------------------------------------------------------------------


def serve(
    topology: Topology,
    *,
    timeout: float = 180.0,
    demo: bool = False,
    log_dir: str | None = None,
    grace: float = GRACE_SECONDS,
    api_key: str | None = None,
    policy: RestartPolicy | None = None,
) -> int:
    """Run the topology's services until Ctrl-C/SIGTERM (0), a crash loop (1), or --demo ends.
    Its secrets must be written already (`write_secrets`)."""
    from splitserve.launcher.run_secrets import client_tls

    check_ports_free(topology)
    console = Console([s.name for s in topology.services], log_dir)
    mesh = Mesh(topology, console, client_tls(topology), policy)
    stop = threading.Event()
    restore = _handle_signals(stop, mesh.force)
    try:
        if not mesh.start(timeout, stop):
            return 0
        http_port = topology.router.ports["http"]
        model = served_model(http_port, api_key)
        console.say(describe(topology, model, log_dir, api_key))
        if demo:
            run_demo(http_port, model, console, api_key)
            return 0
        crash_loop = mesh.supervise(stop)
        if crash_loop is None:
            return 0
        name, reason = crash_loop
        _print_lines(console, mesh.tails([name]))
        console.say(f"splitserve: error: {reason}; stopping the rest", sys.stderr)
        return 1
    except StartupError as exc:
        _print_lines(console, mesh.tails(exc.culprits))
        raise LaunchError(str(exc)) from None
    finally:
        if mesh.children:
            console.say(f"splitserve: stopping {', '.join(reversed(mesh.children))}")
        mesh.stop(grace)
        console.close()
        restore()


def _print_lines(console: Console, lines: Iterator[str]) -> None:
    for line in lines:
        console.say(line, sys.stderr)


def _handle_signals(stop: threading.Event, force: threading.Event) -> Callable[[], None]:
    """Ctrl-C, SIGTERM and a closed terminal all mean stop; the second one means now."""

    first: list[float] = []

    def on_signal(signum: int, frame: object) -> None:
        if not first:
            first.append(time.monotonic())
            stop.set()
        # A human's second Ctrl-C comes later than this; one kill delivered twice (to us and
        # to our group, as `timeout` does) must not cut the drain short.
        elif time.monotonic() - first[0] > 0.5:
            force.set()

    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # only the main thread may install handlers (tests drive `stop`)
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, on_signal) for s in sigs}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def check_ports_free(topology: Topology) -> None:
    """Fail in one line before starting anything.

    gRPC servers bind with SO_REUSEPORT, so a second one on a taken port would start "fine"
    and split the traffic with a stranger; a plain bind probe catches that.
    """
    host = topology.placement.bind_host
    for spec in topology.services:
        for role, port in spec.ports.items() if spec.launchable else ():
            if not _port_is_free(host, port):
                raise LaunchError(
                    f"port {port} ({spec.name} {role}) is already in use on {host}; free it or "
                    "move the mesh with --http-port, --grpc-port or --port-offset"
                )


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports nothing listens on now, the OS's choice (all n held open until it has
    them, so they differ)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


# --- what the user sees once up ---------------------------------------------------------------


def describe(
    topology: Topology, model: str | None, log_dir: str | None, api_key: str | None = None
) -> str:
    host = topology.placement.bind_host
    router = topology.router
    http = f"http://{host}:{router.ports['http']}"
    metrics = [("router", f"{http}/metrics")]  # the router serves them on its HTTP port
    metrics += [
        (s.name, f"http://{host}:{s.ports['metrics']}/metrics")
        for s in topology.services
        if "metrics" in s.ports
    ]
    width = max(len(name) for name, _ in metrics)
    body = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 64}
    if model:
        body = {"model": model, **body}
    auth = f" -H {shlex.quote(f'Authorization: Bearer {api_key}')}" if api_key else ""
    lines = [
        f"splitserve is up: {', '.join(s.name for s in topology.services if s.launchable)}",
        f"  HTTP (OpenAI)  {http}/v1",
        f"  gRPC           {host}:{router.ports['grpc']}  (splitserve.v1.Inference, health, "
        "reflection)",
        f"  API key        {api_key or 'none (--no-auth)'}",
        f"  internal       {_internal_plane(topology)}",
        *(
            f"  {'metrics' if i == 0 else '':<15}{name:<{width}}  {url}"
            for i, (name, url) in enumerate(metrics)
        ),
        *([f"  logs           {log_dir}/<service>.log"] if log_dir else []),
        "  try:",
        f"    curl {http}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\",
        f"      -d {shlex.quote(json.dumps(body))}",
        "  Ctrl-C stops everything.",
    ]
    return "\n".join(lines)


def _internal_plane(topology: Topology) -> str:
    s = topology.secrets
    if s is None or not s.tls:
        return "plaintext gRPC on loopback (--insecure)"
    return f"mutual TLS, certificates in {s.dir}"


def _http(
    url: str, body: dict | None = None, timeout: float = 10.0, api_key: str | None = None
) -> dict:
    # No proxy: the router is on loopback and an HTTP(S)_PROXY from the environment would
    # swallow the request.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=data, headers=headers)
    with opener.open(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def served_model(http_port: int, api_key: str | None = None) -> str | None:
    """The router's model id for examples, or None if it won't say."""
    try:
        return _http(f"http://127.0.0.1:{http_port}/v1/models", api_key=api_key)["data"][0]["id"]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def run_demo(
    http_port: int, model: str | None, console: Console, api_key: str | None = None
) -> str:
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": DEMO_PROMPT}],
        "max_tokens": 32,
        "temperature": 0,
    }
    if model:
        body["model"] = model
    url = f"http://127.0.0.1:{http_port}/v1/chat/completions"
    try:
        reply = _http(url, body, timeout=120.0, api_key=api_key)
        answer = reply["choices"][0]["message"]["content"]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise LaunchError(f"demo request to {url} failed: {exc}") from None
    console.say(f"demo> {DEMO_PROMPT}\ndemo< {answer.strip()}")
    return answer
