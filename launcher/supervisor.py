"""Process supervision for `splitserve up`: children, their logs, health, restarts, shutdown.

Each service runs as `python -m splitserve.<svc>` in its own process group, so the terminal's
Ctrl-C reaches the launcher only and the launcher decides the order: start a service once
everything it depends on reports SERVING on grpc.health.v1 (asked over mutual TLS with the
launcher's own certificate when the mesh has one); stop in waves, dependents first (SIGTERM, a
grace period, then SIGKILL to the whole group).

Once up, a child that exits is restarted (`supervise`): after 0.5 s, doubling to 10 s while it
keeps failing, back to 0.5 s once a run lasted a minute, with a log line each time. A restarted
worker joins the router's pool again by itself (--router), and peers reconnect to it. Only a
crash loop (a service exiting more than 5 times within 60 s) gives up: then the whole mesh
stops.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

from splitserve.launcher.topology import ServiceSpec, Topology
from splitserve.services.parent import PARENT_PID_ENV

if TYPE_CHECKING:  # imported where used: `splitserve --help` shouldn't load gRPC
    from splitserve.services.security import TLSConfig

TAIL_LINES = 20
# The router drains for up to 30 s (and its drain covers the workers', which get SIGTERM after
# it has stopped); a worker then has little left, yet may take its own 25 s.
GRACE_SECONDS = 60.0
WAVE_GRACE_SECONDS = 2.0
POLL_SECONDS = 0.25
HEALTH_CHANNEL_OPTIONS = [
    ("grpc.enable_http_proxy", 0),  # an HTTP(S)_PROXY must never see loopback health checks
    # gRPC's reconnect backoff grows to minutes; a worker loading weights for a minute must
    # be seen as SERVING within a second of getting there.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


@dataclass(frozen=True)
class RestartPolicy:
    backoff_s: tuple[float, float] = (0.5, 10.0)  # first wait before a restart, and the longest
    max_restarts: int = 5  # restarts of one service within `window_s`; one more exit gives up
    window_s: float = 60.0  # also: a run this long resets the backoff

    def delay(self, previous: float | None, ran_s: float) -> float:
        if previous is None or ran_s >= self.window_s:
            return self.backoff_s[0]
        return min(2 * previous, self.backoff_s[1])


class StartupError(Exception):
    def __init__(self, message: str, culprits: list[str]) -> None:
        super().__init__(message)
        self.culprits = culprits


# --- output ----------------------------------------------------------------------------------


class Console:
    """Children's log lines and the launcher's own, never interleaved mid-line."""

    def __init__(self, names: list[str], log_dir: str | None) -> None:
        self.lock = threading.Lock()
        self.width = max(map(len, names), default=0)
        self.log_dir = log_dir
        self.files: list[IO[str]] = []
        self._writers: dict[str, Callable[[str], None]] = {}  # a restarted child keeps its own
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)

    def say(self, text: str, stream: IO[str] | None = None) -> None:
        with self.lock:
            print(text, file=stream or sys.stdout, flush=True)

    def writer(self, name: str) -> Callable[[str], None]:
        if name not in self._writers:
            self._writers[name] = self._new_writer(name)
        return self._writers[name]

    def _new_writer(self, name: str) -> Callable[[str], None]:
        if not self.log_dir:
            prefix = f"{name:>{self.width}} | "
            return lambda line: self.say(prefix + line)
        f = open(os.path.join(self.log_dir, f"{name}.log"), "a", buffering=1)  # noqa: SIM115
        self.files.append(f)
        return lambda line: f.write(line + "\n")

    def close(self) -> None:
        for f in self.files:
            f.close()


# --- one child -------------------------------------------------------------------------------


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment of a service we start: ours, the spec's, and our pid so that the child
    dies with us (services.server.follow_launcher). Linux ties that to the thread that forks, so
    it is set only when that is the main thread, which lives as long as we do."""
    env = {**os.environ, **extra}
    env.pop(PARENT_PID_ENV, None)
    if threading.current_thread() is threading.main_thread():
        env[PARENT_PID_ENV] = str(os.getpid())
    return env


class Child:
    def __init__(
        self, spec: ServiceSpec, host: str, console: Console, tls: TLSConfig | None = None
    ) -> None:
        self.spec = spec
        self.host = host
        self.tls = tls
        self.ready = False
        self.started_at = time.monotonic()
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.proc = subprocess.Popen(
            spec.argv(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=child_env(spec.env),
            process_group=0,  # our own group: the terminal's Ctrl-C reaches the launcher only
        )
        self._channel: Any = None
        self._pump = threading.Thread(target=self._copy_log, args=(console.writer(spec.name),))
        self._pump.daemon = True
        self._pump.start()

    @property
    def name(self) -> str:
        return self.spec.name

    def _copy_log(self, write: Callable[[str], None]) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.tail.append(line)
            write(line)

    def is_serving(self) -> bool:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from splitserve.services.security import open_sync_channel

        if self._channel is None:
            address = f"{self.host}:{self.spec.ports[self.spec.probe]}"
            self._channel = open_sync_channel(address, self.tls, HEALTH_CHANNEL_OPTIONS)
        try:
            reply = health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1.0
            )
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def finish_log(self) -> None:
        """After the process is gone: let the pump copy its last lines."""
        self._pump.join(timeout=2.0)

    def close(self) -> None:
        self.finish_log()
        self.close_channel()


# --- the mesh --------------------------------------------------------------------------------


class Mesh:
    def __init__(
        self,
        topology: Topology,
        console: Console,
        tls: TLSConfig | None = None,
        policy: RestartPolicy | None = None,
    ) -> None:
        self.topology = topology
        self.console = console
        self.tls = tls  # the launcher's certificate, for health probes
        self.policy = policy or RestartPolicy()
        self.children: dict[str, Child] = {}
        self.force = threading.Event()  # a second Ctrl-C: no more waiting for drains
        self.restarts: dict[str, _Restarts] = {}

    def start(self, timeout: float, stop: threading.Event) -> bool:
        """Start services as their dependencies come up; False if `stop` was set first."""
        pending = [s for s in self.topology.services if s.launchable]
        deadline = time.monotonic() + timeout
        while pending or not all(c.ready for c in self.children.values()):
            if stop.is_set():
                return False
            pending = [s for s in pending if not self._start_if_deps_ready(s)]
            self._check_alive()
            for child in self.children.values():
                child.ready = child.ready or child.is_serving()
                if child.ready:
                    child.close_channel()  # done with it; it would only log the shutdown
            if time.monotonic() > deadline:
                stuck = [c.name for c in self.children.values() if not c.ready]
                raise StartupError(
                    f"{', '.join(stuck)} did not report SERVING within {timeout:g}s", stuck
                )
            stop.wait(POLL_SECONDS)
        return True

    def _start_if_deps_ready(self, spec: ServiceSpec) -> bool:
        for dep in spec.depends_on:
            # A dependency we don't launch (the user's Redis) counts as ready.
            if self.topology.service(dep).launchable and not (
                dep in self.children and self.children[dep].ready
            ):
                return False
        self._launch(spec)
        return True

    def _launch(self, spec: ServiceSpec) -> Child:
        child = Child(spec, self.topology.placement.bind_host, self.console, self.tls)
        self.children[spec.name] = child
        self.console.say(f"splitserve: started {spec.name} (pid {child.proc.pid})")
        return child

    def _check_alive(self) -> None:
        dead = self.first_exited()
        if dead is not None:
            raise StartupError(
                f"{dead.name} exited with status {dead.proc.returncode} before it was ready",
                [dead.name],
            )

    def first_exited(self) -> Child | None:
        return next((c for c in self.children.values() if c.proc.poll() is not None), None)

    def supervise(self, stop: threading.Event) -> tuple[str, str] | None:
        """Keep the started mesh running until `stop` is set (None): restart each child that
        exits, after its backoff. Gives up on a crash loop: (the service, why in one line)."""
        due: dict[str, float] = {}  # service -> when to start it again
        while not stop.wait(POLL_SECONDS):
            now = time.monotonic()
            for child in list(self.children.values()):
                if child.name in due:
                    continue
                if child.proc.poll() is not None:
                    reason = self._exited(child, now, due)
                    if reason is not None:
                        return child.name, reason
                elif not child.ready and child.is_serving():
                    child.ready = True
                    child.close_channel()
                    self.console.say(f"splitserve: {child.name} is serving again")
            for name, when in list(due.items()):
                if now >= when:
                    del due[name]
                    self._launch(self.children[name].spec)
        return None

    def _exited(self, child: Child, now: float, due: dict[str, float]) -> str | None:
        """Schedule a restart of a child that exited; the give-up reason on a crash loop."""
        child.signal_group(signal.SIGKILL)  # whatever it left in its group (TP ranks)
        child.close()
        code = child.proc.returncode
        history = self.restarts.setdefault(child.name, _Restarts())
        history.exits = [t for t in history.exits if now - t < self.policy.window_s] + [now]
        if len(history.exits) > self.policy.max_restarts:
            return (
                f"{child.name} exited {len(history.exits)} times within "
                f"{self.policy.window_s:g}s (last status {code}); giving up"
            )
        history.delay = self.policy.delay(history.delay, now - child.started_at)
        self.console.say(
            f"splitserve: {child.name} exited with status {code}; restarting it in "
            f"{history.delay:g}s",
            sys.stderr,
        )
        due[child.name] = now + history.delay
        return None

    def stop(self, grace: float = GRACE_SECONDS) -> None:
        """SIGTERM in waves, dependents first: the router drains while the workers its
        in-flight requests need (a decode pulling KV from a prefill) still serve. A wave's
        stragglers get SIGKILL at `grace` after the first SIGTERM; a later wave still gets
        WAVE_GRACE_SECONDS of its own, so one stuck router can't deny the rest a clean exit."""
        deadline = time.monotonic() + grace
        running = list(self.children.values())
        while running:
            wave = [c for c in running if not any(c.name in o.spec.depends_on for o in running)]
            wave = wave or running  # a cycle can't come from Topology; don't hang on one anyway
            for child in wave:
                child.signal_group(signal.SIGTERM)
            wave_deadline = max(deadline, time.monotonic() + WAVE_GRACE_SECONDS)
            for child in wave:
                while child.proc.poll() is None and time.monotonic() < wave_deadline:
                    if self.force.wait(0.05):
                        break
                self._kill(child)
            running = [c for c in running if c not in wave]

    @staticmethod
    def _kill(child: Child) -> None:
        # The whole group: whatever a service spawned (TP ranks) goes with it.
        child.signal_group(signal.SIGKILL)
        child.proc.wait()
        child.close()

    def tails(self, names: list[str]) -> Iterator[str]:
        for name in names:
            child = self.children.get(name)
            if child is None:
                continue
            if child.proc.poll() is not None:
                child.finish_log()
            yield f"--- last log lines of {name} ---"
            yield from child.tail


@dataclass
class _Restarts:
    exits: list[float] = field(default_factory=list)  # when it exited, within the window
    delay: float | None = None  # the last wait before restarting it
