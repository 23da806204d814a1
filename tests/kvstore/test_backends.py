"""kvstore backends: the same semantics in memory and in (real) Redis, eviction, distrust of
stored values, and Redis batching counted in round trips."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import redis
import redis.asyncio.connection
from kvstore_testing import (
    SHARED_REDIS_URL,
    delete_prefix,
    make_keys,
    payload,
    throwaway_redis,
    unique_prefix,
)
from ports import free_port

from splitserve.kvstore.backends import BackendError, KVBackend, MemoryBackend, RedisBackend


@pytest_asyncio.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[KVBackend]:
    if request.param == "memory":
        b: KVBackend = MemoryBackend(max_bytes=1 << 20)
    else:
        prefix = unique_prefix()
        b = RedisBackend(SHARED_REDIS_URL, prefix=prefix)
        request.addfinalizer(lambda: delete_prefix(SHARED_REDIS_URL, prefix))
    await b.start()
    yield b
    await b.close()


@pytest.mark.asyncio
async def test_match_is_the_leading_run_of_present_keys(backend: KVBackend) -> None:
    a, b, c, x = make_keys(4, "match")
    assert await backend.put_many([(k, payload(k)) for k in (a, b, c)]) == 3
    assert await backend.match([a, b, c]) == 3
    assert await backend.match([a, b, c, x]) == 3
    assert await backend.match([a, x, c]) == 1  # stops at the first miss
    assert await backend.match([x, a]) == 0
    assert await backend.match([]) == 0


@pytest.mark.asyncio
async def test_get_many_keeps_order_and_counts(backend: KVBackend) -> None:
    a, b, x = make_keys(3, "get")
    await backend.put_many([(a, payload(a)), (b, payload(b, 100))])
    assert await backend.get_many([b, x, a]) == [payload(b, 100), None, payload(a)]
    assert await backend.get_many([]) == []
    stats = await backend.stats()
    assert (stats["backend"], stats["hits"], stats["misses"], stats["puts"]) == (
        backend.name,
        2,
        1,
        2,
    )


@pytest.mark.asyncio
async def test_corrupted_or_misplaced_value_is_a_miss_and_deleted(backend: KVBackend) -> None:
    flipped, misplaced, truncated, good = make_keys(4, "corrupt")
    bad = bytearray(payload(flipped))
    bad[-1] ^= 0xFF
    await backend.put_many(
        [
            (flipped, bytes(bad)),
            (misplaced, payload(good)),  # a valid payload, but for another key
            (truncated, payload(truncated)[:-1]),
            (good, payload(good)),
        ]
    )
    assert await backend.match([flipped, misplaced, truncated, good]) == 4  # EXISTS can't tell
    assert await backend.get_many([flipped, misplaced, truncated, good]) == [
        None,
        None,
        None,
        payload(good),
    ]
    for key in (flipped, misplaced, truncated):
        assert await backend.match([key]) == 0  # deleted, not just hidden
    stats = await backend.stats()
    assert (stats["corrupt"], stats["hits"], stats["misses"]) == (3, 1, 3)


@pytest.mark.asyncio
async def test_memory_lru_evicts_least_recently_used_by_bytes() -> None:
    a, b, c, d, big = make_keys(5, "lru")
    entry = 32 + len(payload(a))  # key + value bytes
    store = MemoryBackend(max_bytes=3 * entry)
    await store.put_many([(k, payload(k)) for k in (a, b, c)])
    await store.get_many([a])  # a is now the most recently used: b is next out
    await store.put_many([(d, payload(d))])
    assert [await store.match([k]) for k in (a, b, c, d)] == [1, 0, 1, 1]
    stats = await store.stats()
    assert (stats["num_blocks"], stats["num_bytes"], stats["evictions"]) == (3, 3 * entry, 1)
    # A value that can never fit is refused rather than flushing the whole cache for nothing.
    assert await store.put_many([(big, payload(big, 10 * entry))]) == 0
    assert (await store.stats())["num_blocks"] == 3


@pytest.mark.asyncio
async def test_redis_maxmemory_evicts_with_allkeys_lru() -> None:
    with throwaway_redis() as url:
        store = RedisBackend(url, prefix=b"t:", max_bytes=2 * 1024 * 1024)
        await store.start()  # sets maxmemory + allkeys-lru because max_bytes was asked for
        config = redis.Redis.from_url(url, decode_responses=True).config_get("maxmemory*")
        assert config["maxmemory"] == str(2 * 1024 * 1024)
        assert config["maxmemory-policy"] == "allkeys-lru"
        keys = make_keys(64, "evict")
        for i in range(0, len(keys), 8):  # 4 MiB in all: twice what fits
            batch = keys[i : i + 8]
            assert await store.put_many([(k, payload(k, 64 * 1024)) for k in batch]) == 8
        stats = await store.stats()
        assert stats["evictions"] > 0
        assert stats["num_bytes"] <= 2 * 1024 * 1024
        assert await store.get_many(keys[-2:]) == [payload(k, 64 * 1024) for k in keys[-2:]]
        assert await store.match(keys) == 0  # the oldest blocks went first
        await store.close()


@pytest.mark.asyncio
async def test_redis_backend_leaves_server_config_alone_unless_asked() -> None:
    with throwaway_redis("--maxmemory", "3mb") as url:
        store = RedisBackend(url, prefix=b"t:")
        await store.start()
        config = redis.Redis.from_url(url, decode_responses=True).config_get("maxmemory")
        assert config["maxmemory"] == str(3 * 1024 * 1024)
        await store.close()


@pytest.mark.asyncio
async def test_redis_batches_are_one_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    round_trips = 0
    send = redis.asyncio.connection.AbstractConnection.send_packed_command

    async def counting_send(self, command, check_health=True):  # type: ignore[no-untyped-def]
        nonlocal round_trips
        round_trips += 1
        return await send(self, command, check_health)

    monkeypatch.setattr(
        redis.asyncio.connection.AbstractConnection, "send_packed_command", counting_send
    )
    prefix = unique_prefix()
    store = RedisBackend(SHARED_REDIS_URL, prefix=prefix)
    try:
        await store.start()  # connects (and handshakes) before we count
        keys = make_keys(20, "rtt")
        counts = {}
        for name, call in [
            ("put_many", store.put_many([(k, payload(k)) for k in keys])),
            ("match", store.match(keys)),
            ("get_many", store.get_many(keys)),
            ("unbatched", _get_one_by_one(store, prefix, keys)),
        ]:
            round_trips = 0
            await call
            counts[name] = round_trips
        assert counts == {"put_many": 1, "match": 1, "get_many": 1, "unbatched": 20}
    finally:
        await store.close()
        delete_prefix(SHARED_REDIS_URL, prefix)


async def _get_one_by_one(store: RedisBackend, prefix: bytes, keys: list[bytes]) -> None:
    """What a naive tier does (LMCache PR#1293): a GET per block."""
    for key in keys:
        await store._redis.get(prefix + key)


@pytest.mark.asyncio
async def test_redis_down_is_a_backend_error_fast() -> None:
    store = RedisBackend(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5)
    start = time.monotonic()
    for call in (store.start(), store.match(make_keys(2)), store.get_many(make_keys(2))):
        with pytest.raises(BackendError, match="redis at"):
            await call
    assert time.monotonic() - start < 1.0
    await store.close()
