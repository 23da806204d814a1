"""KVStoreClient: a store that is down, slow or full costs the caller a miss, never a failure or
a wait, and an outage is logged once."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from kvstore_testing import make_keys, payload
from ports import free_port

from splitserve.kvstore.backends import MemoryBackend
from splitserve.kvstore.service import KVStoreServicer
from splitserve.v1 import rpc
from splitserve.workers.kvstore_client import KVStoreClient


async def _serve(port: int = 0) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    rpc.add_KVStoreServicer_to_server(KVStoreServicer(MemoryBackend(1 << 20)), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, f"127.0.0.1:{bound}"


@pytest_asyncio.fixture
async def address() -> AsyncIterator[str]:
    server, addr = await _serve()
    yield addr
    await server.stop(None)


def _outage_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.message for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.asyncio
async def test_roundtrip_and_counters(address: str) -> None:
    client = KVStoreClient(address)
    a, b, x = make_keys(3, "client")
    assert await client.put([(a, payload(a)), (b, payload(b))]) == 2
    assert await client.match([a, b, x]) == 2
    assert await client.get([a, x, b]) == [payload(a), None, payload(b)]
    c = client.counters
    assert (c.hits, c.misses, c.bytes_fetched, c.puts, c.errors) == (
        2,
        1,
        len(payload(a)) + len(payload(b)),
        2,
        0,
    )
    await client.close()


@pytest.mark.asyncio
async def test_put_background_is_bounded_drops_when_full_and_never_waits(address: str) -> None:
    client = KVStoreClient(address, queue_size=2)
    keys = make_keys(10, "bg")
    start = time.monotonic()
    accepted = [client.put_background([(k, payload(k))]) for k in keys]
    assert time.monotonic() - start < 0.05  # no RPC on the caller's path
    assert accepted == [True, True] + [False] * 8
    assert await client.flush(timeout_s=5)
    assert await client.match(keys[:2]) == 2
    assert (client.counters.puts, client.counters.dropped_puts) == (2, 8)
    await client.close()


@pytest.mark.asyncio
async def test_put_background_is_bounded_in_bytes_too(address: str) -> None:
    """Queued payload bytes stay under queue_bytes (a put is still taken when nothing is queued,
    whatever its size), and are given back as the writer sends them."""
    keys = make_keys(6, "bytes")
    size = len(payload(keys[0]))
    client = KVStoreClient(address, queue_bytes=2 * size + 1)
    big = [(k, payload(k)) for k in keys[:3]]  # more than the budget on its own
    assert client.put_background(big)  # an empty queue takes it
    assert not client.put_background([(keys[3], payload(keys[3]))])
    assert await client.flush(timeout_s=5)
    assert [client.put_background([(k, payload(k))]) for k in keys[3:]] == [True, True, False]
    assert await client.flush(timeout_s=5)
    assert await client.match(keys) == 5
    assert (client.counters.puts, client.counters.dropped_puts) == (5, 2)
    await client.close()


@pytest.mark.asyncio
async def test_dead_store_answers_misses_fast_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="splitserve")
    client = KVStoreClient(f"127.0.0.1:{free_port()}", timeout_s=0.5, backoff_s=2.0)
    keys = make_keys(4, "dead")
    start = time.monotonic()
    for _ in range(5):
        assert await client.match(keys) == 0
        assert await client.get(keys) == [None] * 4
        assert await client.put([(keys[0], payload(keys[0]))]) == 0
        assert client.put_background([(keys[1], payload(keys[1]))])
    assert time.monotonic() - start < 1.0
    assert client.counters.errors == 1  # one failed RPC; the rest never left the process
    assert client.counters.skipped == 14
    assert client.counters.misses == 20
    assert len(_outage_warnings(caplog)) == 1
    await client.close()


@pytest.mark.asyncio
async def test_slow_store_hits_the_deadline_then_backs_off() -> None:
    # Accepts TCP connections and never answers: a hung store, not a dead one.
    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    client = KVStoreClient(f"127.0.0.1:{port}", timeout_s=0.2)
    keys = make_keys(2, "slow")
    start = time.monotonic()
    assert await client.match(keys) == 0
    assert await client.get(keys) == [None, None]  # backing off: no second wait
    elapsed = time.monotonic() - start
    assert 0.15 < elapsed < 0.6
    assert client.counters.errors == 1
    await client.close()
    silent.close()


@pytest.mark.asyncio
async def test_recovers_when_the_store_comes_back(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="splitserve")
    port = free_port()
    client = KVStoreClient(f"127.0.0.1:{port}", backoff_s=0.05)
    (key,) = make_keys(1, "back")
    assert await client.put([(key, payload(key))]) == 0  # down
    server, _ = await _serve(port)
    try:
        stored = 0
        for _ in range(100):  # gRPC's own reconnect backoff decides when; 1 s in practice
            await asyncio.sleep(0.05)
            if (stored := await client.put([(key, payload(key))])) == 1:
                break
        assert stored == 1
        assert await client.get([key]) == [payload(key)]
        assert len(_outage_warnings(caplog)) == 1
        assert any("answering again" in r.message for r in caplog.records)
    finally:
        await client.close()
        await server.stop(None)
