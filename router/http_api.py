"""OpenAI-compatible HTTP on the router's event loop (aiohttp).

POST /v1/completions, POST /v1/chat/completions (JSON, or SSE with `stream: true`), GET
/v1/models, GET /health (200 only while a decode or colocated worker is healthy), GET /metrics.

Every error has OpenAI's shape. A body over `max_body_bytes` gets 413 from its Content-Length
alone, or once that many bytes have arrived, never after reading it all. A client that goes
away cancels its handler (`handler_cancellation`), which cancels the worker's stream.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

from aiohttp import web
from opentelemetry import propagate
from prometheus_client import CONTENT_TYPE_LATEST

from .app import Router
from .errors import RequestTooLargeError, RequestValidationError, RouterError
from .generation import GenerationDelta
from .openai_protocol import Accumulator, Formatter, ParsedRequest, parse_chat, parse_completion

log = logging.getLogger("splitserve.router")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Parser = Callable[[dict[str, Any], int, str | None], ParsedRequest]

# Seconds a refused request's unread body is drained before the connection closes.
LINGER_S = 1.0


class HttpApi:
    def __init__(self, router: Router, host: str, port: int) -> None:
        self.router = router
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.router.config.max_body_bytes,
            middlewares=[self._errors],
        )
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        return app

    async def start(self) -> None:
        self._runner = web.AppRunner(
            self.app(),
            handler_cancellation=True,
            access_log=None,
            lingering_time=LINGER_S,
            shutdown_timeout=2.0,  # in-flight requests were drained before this
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        log.info("router http on %s:%d", self.host, self.bound_port())

    def bound_port(self) -> int:
        """The port actually bound (differs from `port` when that was 0)."""
        if self._runner is None or not self._runner.addresses:
            return self.port
        return int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- endpoints --------------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completions", parse_completion, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat", parse_chat, chat=True)

    async def models(self, request: web.Request) -> web.Response:
        m = self.router.model
        card = {
            "id": m.name,
            "object": "model",
            "created": self.router.created,
            "owned_by": "splitserve",
            "max_model_len": m.max_model_len,
        }
        return web.json_response({"object": "list", "data": [card]})

    async def health(self, request: web.Request) -> web.Response:
        workers = {w.address: w.healthy for w in self.router.workers.workers}
        ok = self.router.workers.has_healthy_decoder() and not self.router.draining
        body = {"status": "ok" if ok else "unavailable", "workers": workers}
        return web.json_response(body, status=200 if ok else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.router.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    # ---- generation -------------------------------------------------------------------------
    async def _generate(
        self, request: web.Request, api: str, parse: Parser, chat: bool
    ) -> web.StreamResponse:
        arrival = time.monotonic()
        with self.router.admit(api):
            body, size = await _read_json(request, self.router.config.max_body_bytes)
            parsed = parse(body, size, request.headers.get("Authorization"))
            validated = await self.router.validate(parsed.raw)
            fmt = Formatter(chat, validated.request_id, self.router.model.name, parsed.top_logprobs)
            # Trace context from the caller's W3C `traceparent` header, if it sent one.
            parent = propagate.extract(dict(request.headers))
            deltas = self.router.generate(validated, parent, arrival)
            async with aclosing(deltas) as stream:
                if parsed.stream.stream:
                    return await _stream(request, stream, fmt, parsed.stream.include_usage)
                acc = Accumulator()
                async for delta in stream:
                    acc.add(delta)
                return web.json_response(fmt.response(acc))

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except RouterError as e:
            return _error_response(e)
        except web.HTTPException as e:  # unknown path, wrong method: still OpenAI's shape
            err = RequestValidationError(str(e.status), e.reason)
            return web.json_response(err.openai_body(), status=e.status)
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            return _error_response(RouterError("internal error in the router", "internal_error"))


async def _stream(
    request: web.Request,
    deltas: AsyncIterator[GenerationDelta],
    fmt: Formatter,
    include_usage: bool,
) -> web.StreamResponse:
    # Wait for the first delta before sending headers: routing errors (no worker, overload)
    # still get their own status code instead of a 200 with an error inside.
    first = await anext(deltas, None)
    headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    resp = web.StreamResponse(headers=headers)
    await resp.prepare(request)
    opening = fmt.first_chunk()
    if opening is not None:
        await resp.write(_sse(opening))
    try:
        await _write_events(resp, first, deltas, fmt, include_usage)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
    except ConnectionError:  # the client left; closing `deltas` cancels the worker's stream
        log.debug("client left during a stream")
    return resp


async def _write_events(
    resp: web.StreamResponse,
    delta: GenerationDelta | None,
    deltas: AsyncIterator[GenerationDelta],
    fmt: Formatter,
    include_usage: bool,
) -> None:
    usage = None
    try:
        while delta is not None:
            usage = delta.usage or usage
            await resp.write(_sse(fmt.chunk(delta)))
            delta = await anext(deltas, None)
        if include_usage:
            await resp.write(_sse(fmt.usage_chunk(usage)))
    except RouterError as e:  # after the headers, an error can only be an event
        await resp.write(_sse(e.openai_body()))


async def _read_json(request: web.Request, limit: int) -> tuple[dict[str, Any], int]:
    length = request.content_length
    if length is not None and length > limit:
        raise RequestTooLargeError(length, limit)  # refused before reading a byte of it
    try:
        raw = await request.read()  # stops once client_max_size bytes have arrived
    except web.HTTPRequestEntityTooLarge as e:  # chunked: no Content-Length to check first
        raise RequestTooLargeError(None, limit) from e
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestValidationError("invalid_json", f"the body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise RequestValidationError("invalid_json", "the body must be a JSON object")
    return body, len(raw)


def _error_response(err: RouterError) -> web.Response:
    resp = web.json_response(err.openai_body(), status=err.http_status)
    if isinstance(err, RequestTooLargeError):
        resp.force_close()  # don't keep a connection whose body we won't read
    return resp


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"
