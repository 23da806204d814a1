"""Helpers shared by the kvstore tests: keys, valid payloads, free ports, a throwaway Redis."""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from splitserve.engine.kv_payload import encode_payload

SHARED_REDIS_URL = "redis://127.0.0.1:6379/0"


def make_keys(n: int, tag: str = "") -> list[bytes]:
    """n distinct 32-byte keys, distinct across tests (tag) and runs (uuid)."""
    run = uuid.uuid4().hex
    return [hashlib.sha256(f"{run}:{tag}:{i}".encode()).digest() for i in range(n)]


def payload(key: bytes, size: int = 64) -> bytes:
    """A valid payload for `key` carrying `size` bytes."""
    data = hashlib.sha256(key).digest() * (size // 32 + 1)
    return encode_payload(key, "uint8", (size,), data[:size])


def unique_prefix() -> bytes:
    return f"splitserve:test:{uuid.uuid4().hex}:".encode()


def delete_prefix(url: str, prefix: bytes) -> None:
    """Removes what a test left under its own prefix on a shared Redis (never FLUSHDB)."""
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=prefix + b"*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def throwaway_redis(*extra_args: str) -> Iterator[str]:
    """A private redis-server on a free port (no persistence), killed afterwards; yields its URL."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen([*args, *extra_args], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        _wait_for_redis(url, proc)
        yield url
    finally:
        proc.kill()
        proc.wait(timeout=5)


def _wait_for_redis(url: str, proc: subprocess.Popen, timeout_s: float = 5.0) -> None:
    client = redis.Redis.from_url(url, socket_connect_timeout=0.2)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {proc.returncode}")
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    return
            time.sleep(0.02)
        raise TimeoutError(f"redis-server at {url} did not answer in {timeout_s}s")
    finally:
        client.close()
