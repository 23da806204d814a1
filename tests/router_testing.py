"""For the router's tests: real service processes (start, wait for grpc.health.v1 SERVING,
stop with SIGTERM and report the exit status), and a Router's servicer on an in-process server."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve.router.app import Router


class Service:
    """One `python -m MODULE ARGS...` process, logging to a file."""

    def __init__(self, name: str, module: str, args: list[str], log_dir: Path, port: int) -> None:
        self.name = name
        self.port = port
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args], stdout=self._log, stderr=subprocess.STDOUT
        )

    def log_tail(self, num_chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-num_chars:]

    def wait_serving(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited early:\n{self.log_tail()}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"{self.name} not SERVING after {timeout_s}s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, wait for the drain; kill if it hangs. Returns the exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def serve_router(
    router: Router,
    add_servicer: Callable[[grpc.aio.Server], None],
    stub_type: Callable[[grpc.aio.Channel], Any],
    scenario: Callable[[Router, Any], Awaitable[None]],
) -> Router:
    """Runs `scenario(router, stub)` against one of the router's servicers on a real grpc.aio
    server on a free port in this process; then stops the server and closes the router."""

    async def run() -> None:
        server = grpc.aio.server()
        add_servicer(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await scenario(router, stub_type(channel))
        finally:
            await server.stop(None)
            await router.close()

    asyncio.run(run())
    return router
