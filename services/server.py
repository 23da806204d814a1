"""One way to run a gRPC service: grpc.aio on uvloop, health, reflection, SIGTERM drain.

    async def main():
        server = ServiceServer("kvstore", address="127.0.0.1:50060")
        pb2_grpc.add_KVStoreServicer_to_server(MyServicer(), server.grpc)
        await server.run(service_names=["splitserve.v1.KVStore"])

`run` starts serving, marks every service SERVING in `grpc.health.v1`, and on SIGTERM/SIGINT
flips them to NOT_SERVING, lets in-flight RPCs finish for `drain_seconds`, then stops.

An internal service binds through `security.add_port`: mutual TLS when given a `TLSConfig`,
else plaintext, and then only on loopback. The router's public port is `public=True`: TLS
without client certificates when given `public_tls`, plaintext on any address otherwise (its
callers authenticate with API keys). A second server in the same process (the router's
internal port) uses `start`, `set_serving` and `stop` instead of `run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from splitserve.services.security import PublicTLS, TLSConfig, add_port, add_public_port
from splitserve.v1 import pb

log = logging.getLogger("splitserve")

MAX_MESSAGE_BYTES = 8 * 1024 * 1024  # KV chunks are at most 4 MiB; leave room for headers

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]


GIL_SWITCH_INTERVAL_S = 0.0005
QUIET_GRPC = ("ERROR", "WARNING", "NONE")  # verbosities that drop refused-handshake lines


def fast_gil_handoff() -> None:
    """Shorten the interpreter's GIL switch interval (default 5 ms) for a process whose compute
    thread shares the GIL with gRPC threads. The compute thread gives the GIL up at every torch
    op and kernel call and needs it back to issue the next; a gRPC thread that wants it while
    the compute thread runs Python waits for the interval to pass. Either way, at 5 ms a wait,
    hundreds of times a step, a decode step or a pipeline hop stalls."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)


def install_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()


def configure_logging(name: str, level: str = "INFO") -> None:
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s {name} %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )


class ServiceServer:
    def __init__(
        self,
        name: str,
        address: str,
        max_concurrent_rpcs: int | None = 1024,
        options: list[tuple[str, int]] | None = None,
        tls: TLSConfig | None = None,
        *,
        public: bool = False,
        public_tls: PublicTLS | None = None,
    ) -> None:
        self.name = name
        self.address = address
        self.tls = None if public else tls
        self._security = " (mutual TLS)" if self.tls else " (TLS)" if public and public_tls else ""
        self.grpc = grpc.aio.server(
            options=options or CHANNEL_OPTIONS, maximum_concurrent_rpcs=max_concurrent_rpcs
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        if public:
            self.port = add_public_port(self.grpc, address, public_tls)
        else:
            self.port = add_port(self.grpc, address, tls)
        if self.port == 0:
            raise OSError(f"{name}: cannot bind {address}")
        if self.tls and os.environ.get("GRPC_VERBOSITY", "").upper() in QUIET_GRPC:
            log.warning(
                "%s: GRPC_VERBOSITY=%s hides gRPC's 'Handshake failed' lines, the only record "
                "of callers refused for want of a valid certificate",
                name, os.environ["GRPC_VERBOSITY"],
            )  # fmt: skip
        self._stopping = asyncio.Event()
        self._service_names: list[str] = []

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for svc in ["", *self._service_names]:
            await self.health.set(svc, status)

    def request_stop(self) -> None:
        self._stopping.set()

    @property
    def bound(self) -> str:
        """host:port as bound (the port the OS chose for port 0)."""
        return f"{self.address.rsplit(':', 1)[0]}:{self.port}"

    async def start(self, service_names: Iterable[str], reflect: bool = True) -> None:
        """Serve (health NOT_SERVING until `set_serving(True)`); `run` does this itself."""
        self._service_names = list(service_names)
        if reflect:
            names = [*self._service_names, reflection.SERVICE_NAME, health.SERVICE_NAME]
            reflection.enable_server_reflection(names, self.grpc)
        await self.grpc.start()

    async def stop(self, grace: float | None) -> None:
        await self.grpc.stop(grace=grace)

    async def run(
        self,
        service_names: Iterable[str],
        drain_seconds: float = 10.0,
        on_started: Callable[[], Awaitable[None]] | None = None,
        on_draining: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        await self.start(service_names)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        if on_started is not None:
            await on_started()
        await self.set_serving(True)
        log.info("%s serving on %s%s", self.name, self.bound, self._security)
        await self._stopping.wait()
        log.info("%s draining (up to %.0fs)", self.name, drain_seconds)
        await self.set_serving(False)
        if on_draining is not None:
            await on_draining()
        await self.grpc.stop(grace=drain_seconds)
        log.info("%s stopped", self.name)


def full_service_name(service: str) -> str:
    """'KVStore' -> 'splitserve.v1.KVStore', checked against the generated descriptors."""
    desc = pb.DESCRIPTOR.services_by_name[service]
    return desc.full_name
