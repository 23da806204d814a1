"""Where the kvstore keeps its blocks: an in-memory LRU, or a Redis server.

Both keep one value per key, the block's self-describing payload (metadata and bytes together,
so a fetch is one lookup), and both distrust what they read back: a value whose embedded key or
CRC-32 is wrong is a miss and is deleted, never returned. Neither needs the mesh secret: the
workers verify the blocks' signatures themselves (wire/kv_payload.py).

Redis may need a password (`redis://:PASSWORD@host:port/db`, or `password=` from a file) and
TLS (`rediss://`, with `RedisTLS` naming the CA and, for mutual TLS, a client certificate).
Every command has a socket and connect timeout, and a connection that went stale across a
Redis restart is replaced on the next command: a Redis that is down makes calls fail fast with
BackendError (UNAVAILABLE to the kvstore's callers) and one that comes back is used again
without restarting anything. Passwords never appear in messages (`redact_url`).

Every method is async and never blocks the event loop for long: Redis calls are one round trip
per batch (pipelines, MGET), and checksums of large batches run in a worker thread (zlib releases
the GIL on big buffers).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from splitserve.wire.kv_payload import is_valid_payload

log = logging.getLogger("splitserve")

# Checking a batch this large inline would stall every other RPC for milliseconds.
_THREAD_VERIFY_BYTES = 1 << 20


class BackendError(Exception):
    """The backend could not answer (unreachable, timed out, refused a command)."""


class KVBackend(Protocol):
    name: str

    async def start(self) -> None:
        """Connect and apply configuration; raises BackendError if that fails."""

    async def match(self, keys: Sequence[bytes]) -> int:
        """How many leading keys are present (stops at the first missing one)."""

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """The verified payload of each key, or None (absent or failed its checks)."""

    async def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> int:
        """Store (key, payload) pairs; returns how many were stored."""

    async def delete(self, keys: Sequence[bytes]) -> None: ...

    async def stats(self) -> dict[str, Any]:
        """backend, num_blocks, num_bytes, hits, misses, puts, evictions, corrupt."""

    async def close(self) -> None: ...


async def verify_values(
    keys: Sequence[bytes], values: Sequence[bytes | None], secret: bytes | None = None
) -> list[bool]:
    """Whether each present value is a well-formed payload for its key (signed with `secret`,
    when given)."""

    def check() -> list[bool]:
        return [
            v is not None and is_valid_payload(v, k, secret)
            for k, v in zip(keys, values, strict=True)
        ]

    total = sum(len(v) for v in values if v is not None)
    return await asyncio.to_thread(check) if total > _THREAD_VERIFY_BYTES else check()


class _Counters:
    def __init__(self) -> None:
        self.hits = self.misses = self.puts = self.evictions = self.corrupt = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


async def _drop_corrupt(
    backend: KVBackend, counters: _Counters, keys: Sequence[bytes], values: list[bytes | None]
) -> list[bytes | None]:
    """Values with the corrupt ones replaced by None (and deleted); counts hits and misses."""
    valid = await verify_values(keys, values)
    bad = [k for k, v, ok in zip(keys, values, valid, strict=True) if v is not None and not ok]
    if bad:
        counters.corrupt += len(bad)
        log.warning(
            "kvstore: %d stored block(s) failed their key/checksum check; deleted", len(bad)
        )
        await backend.delete(bad)
    out = [v if ok else None for v, ok in zip(values, valid, strict=True)]
    counters.hits += sum(valid)
    counters.misses += len(valid) - sum(valid)
    return out


class MemoryBackend:
    """An LRU bounded by bytes (key + value), in this process."""

    name = "memory"

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self.num_bytes = 0
        self._data: OrderedDict[bytes, bytes] = OrderedDict()
        self._counters = _Counters()

    async def start(self) -> None:
        pass

    async def match(self, keys: Sequence[bytes]) -> int:
        n = 0
        for key in keys:
            if key not in self._data:
                break
            # A matched prefix is about to be fetched: keep it away from the eviction end.
            self._data.move_to_end(key)
            n += 1
        return n

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        values = [self._touch(k) for k in keys]
        return await _drop_corrupt(self, self._counters, keys, values)

    def _touch(self, key: bytes) -> bytes | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    async def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> int:
        stored = 0
        for key, value in items:
            size = len(key) + len(value)
            if size > self.max_bytes:
                continue  # would evict everything and still not fit
            self._remove(key)
            self._data[key] = value
            self.num_bytes += size
            stored += 1
        self._counters.puts += stored
        self._evict()
        return stored

    def _evict(self) -> None:
        while self.num_bytes > self.max_bytes:
            key, value = self._data.popitem(last=False)
            self.num_bytes -= len(key) + len(value)
            self._counters.evictions += 1

    def _remove(self, key: bytes) -> None:
        value = self._data.pop(key, None)
        if value is not None:
            self.num_bytes -= len(key) + len(value)

    async def delete(self, keys: Sequence[bytes]) -> None:
        for key in keys:
            self._remove(key)

    async def stats(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "num_blocks": len(self._data),
            "num_bytes": self.num_bytes,
            **self._counters.as_dict(),
        }

    async def close(self) -> None:
        self._data.clear()
        self.num_bytes = 0


@dataclass(frozen=True)
class RedisTLS:
    """Files for a rediss:// connection: the CA that signed Redis's certificate (None: the
    system's), and this client's certificate and key when Redis asks for one."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def connection_kwargs(self) -> dict[str, Any]:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a Redis TLS client certificate needs both its cert and its key")
        out: dict[str, Any] = {}
        if self.ca is not None:
            out["ssl_ca_certs"] = self.ca
        if self.cert is not None:
            out["ssl_certfile"], out["ssl_keyfile"] = self.cert, self.key
        return out


def redact_url(url: str) -> str:
    """The URL with its password replaced by ***, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port is not None else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RedisBackend:
    """Blocks in Redis under `prefix + key`, one round trip per batch.

    Redis does the eviction: pass `max_bytes` to have `start()` set `maxmemory` and
    `allkeys-lru` (leave it None when the server is configured elsewhere, or CONFIG is
    disabled). `stats()` reports hits/misses/puts of this process and the server's own key
    count, memory and evictions (server-wide: give the kvstore its own Redis database).
    """

    name = "redis"

    def __init__(
        self,
        url: str,
        prefix: bytes = b"splitserve:kv:",
        max_bytes: int | None = None,
        timeout_s: float = 2.0,
        max_connections: int = 32,
        password: str | None = None,
        tls: RedisTLS | None = None,
    ) -> None:
        """`password`: Redis AUTH's, when the URL carries none; `tls`: files for rediss://."""
        self.url = redact_url(url)  # what messages show
        self.prefix = prefix
        self.max_bytes = max_bytes
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"a Redis URL is redis:// or rediss://, not {self.url!r}")
        if password is not None and parts.password:
            raise ValueError("the Redis password is given twice: in the URL and separately")
        extra: dict[str, Any] = {}
        if password is not None:
            extra["password"] = password
        if tls is not None:
            if parts.scheme != "rediss":
                raise ValueError(f"Redis TLS files were given for a plaintext URL {self.url}")
            extra.update(tls.connection_kwargs())
        # A bounded pool that waits (up to timeout_s) for a free connection; one quick retry
        # covers a pooled connection that went stale across a Redis restart, no more: a cache
        # that is down should fail fast so callers recompute.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1),
            **extra,
        )
        self._redis = aioredis.Redis(connection_pool=pool)
        self._counters = _Counters()

    def _k(self, key: bytes) -> bytes:
        return self.prefix + key

    async def start(self) -> None:
        try:
            await self._redis.ping()
            if self.max_bytes is not None:
                await self._redis.config_set("maxmemory", self.max_bytes)
                await self._redis.config_set("maxmemory-policy", "allkeys-lru")
        except aioredis.AuthenticationError as exc:  # covers a missing password too
            raise BackendError(f"redis at {self.url} refused our credentials: {exc}") from exc
        except (aioredis.RedisError, OSError) as exc:
            raise BackendError(f"redis at {self.url}: {exc}") from exc

    async def match(self, keys: Sequence[bytes]) -> int:
        if not keys:
            return 0
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            pipe.exists(self._k(key))
        found = await self._call(pipe.execute())
        n = 0
        while n < len(found) and found[n]:
            n += 1
        return n

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        if not keys:
            return []
        values = await self._call(self._redis.mget([self._k(k) for k in keys]))
        return await _drop_corrupt(self, self._counters, keys, list(values))

    async def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> int:
        if not items:
            return 0
        pipe = self._redis.pipeline(transaction=False)
        for key, value in items:
            pipe.set(self._k(key), value)
        results = await self._call(pipe.execute(raise_on_error=False))
        stored = sum(1 for r in results if r is True)
        if stored < len(items):
            # e.g. OOM when maxmemory is set without an eviction policy
            log.warning("kvstore: redis refused %d of %d puts", len(items) - stored, len(items))
        self._counters.puts += stored
        return stored

    async def delete(self, keys: Sequence[bytes]) -> None:
        if keys:
            await self._call(self._redis.delete(*[self._k(k) for k in keys]))

    async def stats(self) -> dict[str, Any]:
        pipe = self._redis.pipeline(transaction=False)
        pipe.dbsize().info("memory").info("stats")
        num_blocks, memory, server_stats = await self._call(pipe.execute())
        return {
            "backend": self.name,
            **self._counters.as_dict(),
            "num_blocks": num_blocks,
            "num_bytes": memory.get("used_memory", 0),
            "evictions": server_stats.get("evicted_keys", 0),
        }

    async def close(self) -> None:
        await self._redis.aclose()

    async def _call(self, awaitable: Any) -> Any:
        try:
            return await awaitable
        except (aioredis.RedisError, OSError, TimeoutError) as exc:
            raise BackendError(f"redis at {self.url}: {type(exc).__name__}: {exc}") from exc
