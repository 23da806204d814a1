"""Who may use the router's public doors, and as which tenant.

    auth = Authenticator(["sk-alice", "sk-bob"])
    tenant = auth.authenticate(request.headers.get("Authorization"))  # or AuthenticationError

API keys come from `--api-key` (repeatable), `--api-key-file` (one a line, '#' comments) and
the environment (`SPLITSERVE_API_KEYS`, comma-separated). Authentication is on iff at least
one key is configured; then every generation, model listing and abort on HTTP and gRPC needs
one (`/health`, gRPC health and reflection stay open; `/metrics` too unless
`--metrics-require-key`). The router refuses to listen on a non-loopback address with no key
unless told `--allow-unauthenticated`.

A presented key is compared with every configured key in constant time: both sides are
SHA-256 digests (so the comparison is of equal lengths whatever was sent) and the loop never
stops early, so timing tells nothing about which key, or how much of one, matched.

A key's tenant is a hash of it under a fixed domain string: it names the caller in logs and
metrics without the key, and prefixes the prefix-cache salt so tenants never share cached
blocks (a second tenant's `cached_tokens` says nothing about the first's prompts). The
optional per-key concurrency limit (`--max-inflight-per-key`) keeps one key from taking every
slot of the router's `--max-inflight`.

`add_auth_arguments` also adds the HTTP front door's connection limits (header, idle and body
timeouts, open connections), which `front_door_from_args` returns as `HttpLimits`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import ipaddress
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AuthenticationError, OverloadedError

log = logging.getLogger("splitserve.router")

ENV_API_KEYS = "SPLITSERVE_API_KEYS"
# Domain separation: a tenant id is useless as anything but a tenant id.
_TENANT_DOMAIN = b"splitserve.router.tenant.v1\x00"
_LOG_INTERVAL_S = 10.0


class RateLimitedLog:
    """A warning logged at most once per `interval_s`, with how many times it happened since.

    For events a client can cause at will (refused keys, slow connections): the log says they
    happen without letting anyone flood it. The first hit is logged at once; later ones are
    counted and reported together when the interval is over (on an event loop, by a timer;
    else with the next hit).
    """

    def __init__(self, what: str, interval_s: float = _LOG_INTERVAL_S) -> None:
        self.what = what
        self.interval_s = interval_s
        self.total = 0
        self._pending = 0
        self._detail = ""
        self._last: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    def hit(self, detail: str = "") -> None:
        self.total += 1
        self._pending += 1
        self._detail = detail
        now = time.monotonic()
        if self._last is None or now - self._last >= self.interval_s:
            self._flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._timer = loop.call_later(self._last + self.interval_s - now, self._flush)

    def _flush(self) -> None:
        self._timer = None
        if not self._pending:
            return
        now = time.monotonic()
        span = f" in the last {now - self._last:.0f}s" if self._last is not None else ""
        suffix = f" ({self._detail})" if self._detail else ""
        log.warning(
            "%s: %d time(s)%s, %d in all%s", self.what, self._pending, span, self.total, suffix
        )
        self._pending = 0
        self._last = now


def tenant_of(key: str) -> str:
    """A key's tenant id: 16 bytes of SHA-256 over a domain string and the key, in hex."""
    return hashlib.sha256(_TENANT_DOMAIN + key.encode()).digest()[:16].hex()


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode(errors="surrogatepass")).digest()


class Authenticator:
    """Checks credentials against the configured keys; a no-op when there are none."""

    def __init__(
        self,
        keys: Iterable[str] = (),
        *,
        metrics_require_key: bool = False,
        max_inflight_per_key: int = 0,
    ) -> None:
        unique = list(dict.fromkeys(keys))
        for key in unique:
            _check_key(key)
        self._keys = [(_digest(k), tenant_of(k)) for k in unique]
        self.metrics_require_key = metrics_require_key and bool(unique)
        self.max_inflight_per_key = max_inflight_per_key
        self._inflight: Counter[str] = Counter()
        self.refusals = RateLimitedLog("refused requests without a valid API key")

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    @property
    def num_keys(self) -> int:
        return len(self._keys)

    def authenticate(self, credential: str | None, *, allow_bare: bool = False) -> str | None:
        """The tenant of the key in `credential` (`Bearer KEY`; also a bare `KEY` if
        `allow_bare`), or None when authentication is off. Raises AuthenticationError."""
        if not self._keys:
            return None
        key = _presented_key(credential, allow_bare)
        if key is None:
            self.refusals.hit("no API key")
            raise AuthenticationError("missing API key: send `Authorization: Bearer <key>`")
        tenant = self.match(key)
        if tenant is None:
            self.refusals.hit("wrong API key")
            raise AuthenticationError("incorrect API key provided")
        return tenant

    def match(self, key: str) -> str | None:
        """The tenant of `key` if it is configured; every key is compared, in constant time."""
        presented = _digest(key)
        found = None
        for digest, tenant in self._keys:
            if hmac.compare_digest(digest, presented):
                found = tenant  # no break: the loop's length never depends on the match
        return found

    @contextmanager
    def admit(self, tenant: str | None) -> Iterator[None]:
        """At most `max_inflight_per_key` requests of one tenant at a time (0: no limit)."""
        limit = self.max_inflight_per_key
        if tenant is None or limit <= 0:
            yield
            return
        if self._inflight[tenant] >= limit:
            raise OverloadedError(f"this API key has {limit} requests in flight (its limit)")
        self._inflight[tenant] += 1
        try:
            yield
        finally:
            self._inflight[tenant] -= 1
            if not self._inflight[tenant]:
                del self._inflight[tenant]


def _presented_key(credential: str | None, allow_bare: bool) -> str | None:
    if not credential:
        return None
    scheme, _, rest = credential.strip().partition(" ")
    if scheme.lower() == "bearer" and rest.strip():
        return rest.strip()
    if allow_bare and not rest:
        return scheme
    return None


def _check_key(key: str) -> None:
    if not key or not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
        raise ValueError("an API key must be non-empty printable ASCII without spaces")


# ---- configuration ------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpLimits:
    """The HTTP front door's connection limits (see router/http_guard.py)."""

    header_timeout_s: float = 10.0  # a connection's request headers must be complete by then
    idle_timeout_s: float = 75.0  # keep-alive: an idle connection is closed after this
    body_timeout_s: float = 30.0  # a request body must arrive within this
    max_connections: int = 1024  # more open connections are closed as they arrive


@dataclass(frozen=True)
class FrontDoorConfig:
    auth: Authenticator
    http: HttpLimits = field(default_factory=HttpLimits)


def add_auth_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "authentication (on iff a key is configured; also from $" + ENV_API_KEYS + ")"
    )
    g.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="an accepted API key (repeatable); clients send `Authorization: Bearer KEY`",
    )
    g.add_argument(
        "--api-key-file",
        default=None,
        metavar="PATH",
        help="a file of API keys, one a line; blank lines and '#' comments are ignored",
    )
    g.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="allow a non-loopback --host with no API key configured",
    )
    g.add_argument(
        "--metrics-require-key",
        action="store_true",
        help="/metrics needs an API key too (default: open, like /health)",
    )
    g.add_argument(
        "--max-inflight-per-key",
        type=int,
        default=0,
        metavar="N",
        help="more requests at once from one API key get 429 (default: 0, no limit)",
    )
    h = p.add_argument_group("HTTP connections")
    d = HttpLimits()
    h.add_argument(
        "--http-header-timeout-s",
        metavar="S",
        type=float,
        default=d.header_timeout_s,
        help="close a connection whose request headers aren't complete by then "
        "(default: %(default)s)",
    )
    h.add_argument(
        "--http-idle-timeout-s",
        metavar="S",
        type=float,
        default=d.idle_timeout_s,
        help="close a keep-alive connection idle this long (default: %(default)s)",
    )
    h.add_argument(
        "--http-body-timeout-s",
        metavar="S",
        type=float,
        default=d.body_timeout_s,
        help="a request body must arrive within this; else 408 (default: %(default)s)",
    )
    h.add_argument(
        "--http-max-connections",
        metavar="N",
        type=int,
        default=d.max_connections,
        help="close new connections beyond this many open ones; kept below the file limit "
        "(default: %(default)s)",
    )


def front_door_from_args(args: argparse.Namespace) -> FrontDoorConfig:
    """The flags as a config; ValueError (one line) for a bad key file or an open door."""
    keys = load_api_keys(args.api_key, args.api_key_file, os.environ.get(ENV_API_KEYS))
    if not keys and not args.allow_unauthenticated and not is_loopback(args.host):
        raise ValueError(
            f"refusing to serve on non-loopback --host {args.host} with no API key: give "
            f"--api-key, --api-key-file or ${ENV_API_KEYS}, or --allow-unauthenticated"
        )
    if args.max_inflight_per_key < 0:
        raise ValueError("--max-inflight-per-key must be >= 0")
    http = HttpLimits(
        header_timeout_s=args.http_header_timeout_s,
        idle_timeout_s=args.http_idle_timeout_s,
        body_timeout_s=args.http_body_timeout_s,
        max_connections=args.http_max_connections,
    )
    if min(http.header_timeout_s, http.idle_timeout_s, http.body_timeout_s) <= 0:
        raise ValueError("--http-*-timeout-s must be positive")
    if http.max_connections < 1:
        raise ValueError("--http-max-connections must be >= 1")
    auth = Authenticator(
        keys,
        metrics_require_key=args.metrics_require_key,
        max_inflight_per_key=args.max_inflight_per_key,
    )
    if auth.enabled:
        log.info("API keys required: %d key(s) configured", auth.num_keys)
    else:
        log.warning("no API key configured: the public API is open to anyone who reaches it")
    return FrontDoorConfig(auth, http)


def load_api_keys(
    keys: Sequence[str] = (), key_file: str | None = None, env: str | None = None
) -> list[str]:
    """Keys from the flags, the file and the environment, in that order, deduplicated."""
    found = [k.strip() for k in keys if k.strip()]
    if key_file is not None:
        found += _read_key_file(Path(key_file))
    if env:
        found += [k.strip() for k in env.split(",") if k.strip()]
    for key in found:
        _check_key(key)
    return list(dict.fromkeys(found))


def _read_key_file(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise ValueError(f"--api-key-file {path}: cannot read it: {reason}") from e
    keys = [line.strip() for line in text.splitlines()]
    keys = [k for k in keys if k and not k.startswith("#")]
    if not keys:
        raise ValueError(f"--api-key-file {path}: no key in it")
    return keys


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything
