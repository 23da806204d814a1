"""The HTTP front door's connection limits, with raw sockets against a real in-process HttpApi
(a Router with the SmolLM2 tokenizer and no worker): a slowloris connection is closed with a
408, a slow body gets 408, an idle keep-alive connection is closed, connections past the limit
are closed at once while the open ones keep working, each limit hit is logged; the file limit
is raised at start."""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Awaitable, Callable

import pytest

from splitserve.model.loader import Checkpoint
from splitserve.router.app import Router, RouterConfig
from splitserve.router.auth import HttpLimits
from splitserve.router.http_api import HttpApi
from splitserve.router.http_guard import RESERVED_FDS, connection_budget

Scenario = Callable[[HttpApi], Awaitable[None]]
# Generous: the server must act long before this; only a hang reaches it.
READ_TIMEOUT_S = 30.0
HEALTH = b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n"


def serve(checkpoint: Checkpoint, limits: HttpLimits, scenario: Scenario) -> HttpApi:
    router = Router(RouterConfig(), checkpoint)
    api = HttpApi(router, "127.0.0.1", 0, limits=limits)

    async def run() -> None:
        await api.start()
        try:
            await scenario(api)
        finally:
            await api.stop()
            await router.close()

    asyncio.run(run())
    return api


async def connect(api: HttpApi) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", api.bound_port())


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a Content-Length body: (status, body)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
    lines = head.decode().split("\r\n")
    length = next(int(x.split(":")[1]) for x in lines if x.lower().startswith("content-length"))
    body = await asyncio.wait_for(reader.readexactly(length), READ_TIMEOUT_S)
    return int(lines[0].split()[1]), body


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    try:
        return await asyncio.wait_for(reader.read(), READ_TIMEOUT_S)
    except ConnectionResetError:
        return b""


def test_a_slowloris_connection_is_closed_and_a_normal_client_is_not(
    smollm2_checkpoint: Checkpoint, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(api: HttpApi) -> None:
        slow_reader, slow = await connect(api)
        slow.write(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nX-Slow: a")  # never finished
        await slow.drain()
        # Meanwhile a normal client is served, twice on one kept-alive connection.
        reader, writer = await connect(api)
        for _ in range(2):
            writer.write(HEALTH)
            status, _ = await read_response(reader)
            assert status == 503  # no worker: /health says so
        # The slow one gets a 408 and the connection ends.
        reply = await read_to_eof(slow_reader)
        assert reply.startswith(b"HTTP/1.1 408"), reply[:100]
        assert b'"request_timeout"' in reply
        writer.write(HEALTH)  # the normal client still is served
        assert (await read_response(reader))[0] == 503
        writer.close()
        slow.close()
        assert api.guard is not None and api.guard.slow_headers.total == 1

    with caplog.at_level(logging.WARNING, logger="splitserve.router"):
        serve(smollm2_checkpoint, HttpLimits(header_timeout_s=1.0), scenario)
    assert any("request headers took over" in r.getMessage() for r in caplog.records)


def test_headers_split_across_reads_are_seen_complete(smollm2_checkpoint: Checkpoint) -> None:
    """Blank lines first, then the headers a byte at a time, the last CRLF split: served."""

    async def scenario(api: HttpApi) -> None:
        reader, writer = await connect(api)
        for byte in b"\r\n" + HEALTH:
            writer.write(bytes([byte]))
            await writer.drain()
        assert (await read_response(reader))[0] == 503
        writer.close()
        assert api.guard is not None and api.guard.slow_headers.total == 0

    serve(smollm2_checkpoint, HttpLimits(header_timeout_s=5.0), scenario)


def test_a_slow_body_gets_408(
    smollm2_checkpoint: Checkpoint, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(api: HttpApi) -> None:
        reader, writer = await connect(api)
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"prompt": '
        )
        status, body = await read_response(reader)
        assert status == 408 and b'"request_timeout"' in body
        assert await read_to_eof(reader) == b""  # and the connection is closed
        writer.close()
        assert api.slow_bodies.total == 1

    with caplog.at_level(logging.WARNING, logger="splitserve.router"):
        serve(smollm2_checkpoint, HttpLimits(body_timeout_s=1.0), scenario)
    assert any("(--http-body-timeout-s)" in r.getMessage() for r in caplog.records)


def test_an_idle_keep_alive_connection_is_closed(smollm2_checkpoint: Checkpoint) -> None:
    async def scenario(api: HttpApi) -> None:
        reader, writer = await connect(api)
        writer.write(HEALTH)
        assert (await read_response(reader))[0] == 503
        assert await read_to_eof(reader) == b""  # closed by the server while idle
        writer.close()

    serve(smollm2_checkpoint, HttpLimits(idle_timeout_s=1.0), scenario)


def test_connections_past_the_limit_are_closed_while_the_others_work(
    smollm2_checkpoint: Checkpoint, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(api: HttpApi) -> None:
        assert api.guard is not None
        conns = [await connect(api) for _ in range(3)]
        for reader, writer in conns:  # all three are served, and stay open
            writer.write(HEALTH)
            assert (await read_response(reader))[0] == 503
        extra_reader, extra = await connect(api)
        assert await read_to_eof(extra_reader) == b""  # closed at once, nothing read
        extra.close()
        for reader, writer in conns:  # the first three still work
            writer.write(HEALTH)
            assert (await read_response(reader))[0] == 503
        assert api.guard.refused.total == 1 and api.guard.open == 3
        conns[0][1].close()
        await conns[0][1].wait_closed()
        for _ in range(100):  # the server sees the close on its next loop turns
            if api.guard.open == 2:
                break
            await asyncio.sleep(0.05)
        reader, writer = await connect(api)  # a slot is free again
        writer.write(HEALTH)
        assert (await read_response(reader))[0] == 503
        for _, w in [*conns[1:], (reader, writer)]:
            w.close()

    limits = HttpLimits(max_connections=3, header_timeout_s=60.0)
    with caplog.at_level(logging.WARNING, logger="splitserve.router"):
        serve(smollm2_checkpoint, limits, scenario)
    assert any("closed new HTTP connections" in r.getMessage() for r in caplog.records)


def test_the_file_limit_is_raised_and_the_connection_limit_kept_below_it(
    smollm2_checkpoint: Checkpoint, caplog: pytest.LogCaptureFixture
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if hard != resource.RLIM_INFINITY and hard > 512:
            resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))

        async def scenario(api: HttpApi) -> None:
            assert api.guard is not None
            now_soft, now_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            assert now_soft == now_hard
            assert api.guard.max_connections == connection_budget(10**6, now_soft)

        with caplog.at_level(logging.INFO, logger="splitserve.router"):
            serve(smollm2_checkpoint, HttpLimits(max_connections=10**6), scenario)
        assert any("open-file limit" in r.getMessage() for r in caplog.records)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_connection_budget() -> None:
    assert connection_budget(1024, 1_048_576) == 1024
    assert connection_budget(1024, 1024) == 1024 - RESERVED_FDS
    assert connection_budget(1024, 300) == 150  # half of a small limit at least
    assert connection_budget(1024, resource.RLIM_INFINITY) == 1024
    assert connection_budget(5, 1) == 1
