"""Connection-level limits for the HTTP front door, which aiohttp doesn't have built in.

    guard = ConnectionGuard(HttpLimits(header_timeout_s=10, max_connections=1024))
    server = await loop.create_server(guard.wrap(runner.server), host, port)

`guard.wrap(factory)` returns a protocol factory whose protocols sit between the transport
and aiohttp's own, forwarding everything, and add two limits:

- **Open connections**: a connection that arrives while `max_connections` are open is closed
  at once, before aiohttp sees it, so a flood of sockets can't take the process past its file
  limit (where `accept` fails for everyone, silently). `raise_file_limit()` lifts the soft
  RLIMIT_NOFILE to the hard one at start and `connection_budget` keeps the limit below it.
- **Request headers**: a connection whose first request's headers aren't complete within
  `header_timeout_s` of it opening gets a 408 and is closed (slowloris). The headers end at
  the first empty line, which needs no parsing to find. Later requests on a kept-alive
  connection are bounded by aiohttp's keep-alive timeout (`idle_timeout_s`): it closes a
  connection still waiting for a complete request when it expires.

With TLS, the handshake is bounded by the same header timeout (`ssl_handshake_timeout`), and
the protocol here sees the decrypted bytes. Each limit hit is logged, rate-limited.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from collections.abc import Callable
from typing import Any, cast

from .auth import HttpLimits, RateLimitedLog

log = logging.getLogger("splitserve.router")

# File descriptors left for everything but HTTP connections: gRPC (public and to workers),
# logs, the model's files.
RESERVED_FDS = 256

_TIMEOUT_BODY = json.dumps(
    {
        "error": {
            "message": "the request headers didn't arrive in time",
            "type": "invalid_request_error",
            "param": None,
            "code": "request_timeout",
        }
    }
).encode()
_TIMEOUT_REPLY = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nConnection: close\r\n"
    + f"Content-Length: {len(_TIMEOUT_BODY)}\r\n\r\n".encode()
    + _TIMEOUT_BODY
)


def raise_file_limit() -> tuple[int, int]:
    """Lift the soft RLIMIT_NOFILE to the hard limit; returns (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        return soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as e:
        log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, e)
        return soft, hard
    return hard, hard


def connection_budget(wanted: int, soft_limit: int) -> int:
    """At most `wanted`, and enough below the file limit to leave RESERVED_FDS for the rest."""
    if soft_limit == resource.RLIM_INFINITY:
        return wanted
    room = max(soft_limit - RESERVED_FDS, soft_limit // 2, 1)
    return max(1, min(wanted, room))


class ConnectionGuard:
    """Counts open connections and applies the limits; one per listening server."""

    def __init__(self, limits: HttpLimits, max_connections: int | None = None) -> None:
        self.limits = limits
        self.max_connections = max_connections or limits.max_connections
        self.open = 0
        self.refused = RateLimitedLog(
            f"closed new HTTP connections: {self.max_connections} already open "
            "(--http-max-connections)"
        )
        self.slow_headers = RateLimitedLog(
            f"closed HTTP connections whose request headers took over "
            f"{limits.header_timeout_s}s (--http-header-timeout-s)"
        )

    def wrap(self, factory: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        return lambda: _GuardedProtocol(self, factory)


class _GuardedProtocol(asyncio.Protocol):
    def __init__(self, guard: ConnectionGuard, factory: Callable[[], asyncio.Protocol]) -> None:
        self._guard = guard
        self._factory = factory
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._started = False  # a byte other than a blank line has arrived
        self._tail = b""  # the last bytes seen, for an end of headers split across reads

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, base)  # uvloop's aren't asyncio.Transport subclasses
        guard = self._guard
        if guard.open >= guard.max_connections:
            guard.refused.hit(_peer(transport))
            transport.abort()  # at once: nothing was read, nothing is owed
            return
        guard.open += 1
        self._transport = transport
        self._inner = self._factory()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(guard.limits.header_timeout_s, self._headers_late)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return
        if self._timer is not None and self._headers_complete(data):
            self._timer.cancel()
            self._timer = None
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is None:
            return
        self._guard.open -= 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        inner, self._inner = self._inner, None
        inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def _headers_complete(self, data: bytes) -> bool:
        if not self._started:
            data = data.lstrip(b"\r\n")  # blank lines before a request line are allowed
            if not data:
                return False
            self._started = True
        seen = self._tail + data
        if b"\r\n\r\n" in seen or b"\n\n" in seen:
            return True
        self._tail = seen[-3:]
        return False

    def _headers_late(self) -> None:
        self._timer = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        self._guard.slow_headers.hit(_peer(transport))
        transport.write(_TIMEOUT_REPLY)
        transport.close()


def _peer(transport: asyncio.BaseTransport) -> str:
    peer: Any = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"last from {peer[0]}"
    return ""
