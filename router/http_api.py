"""OpenAI-compatible HTTP on the router's event loop (aiohttp).

POST /v1/completions, POST /v1/chat/completions (JSON, or SSE with `stream: true`), GET
/v1/models, GET /health (200 only while a decode or colocated worker is healthy), GET /metrics.

Every error has OpenAI's shape, and no input reaches a 500: a body that isn't UTF-8 JSON
(NaN and Infinity included) or nests too deep gets 400, a Content-Type other than JSON 415.
A body over `max_body_bytes` gets 413 from its Content-Length alone, or once that many bytes
have arrived, never after reading it all; one that doesn't arrive within the body timeout,
408. A client that goes away cancels its handler (`handler_cancellation`), which cancels the
worker's stream.

With API keys configured (router/auth.py) every path needs `Authorization: Bearer KEY`, else
401 with `WWW-Authenticate: Bearer`, but /health, and /metrics unless `metrics_require_key`.

The listening socket is ours, not aiohttp's `TCPSite`, so that each connection passes through
`ConnectionGuard` (router/http_guard.py: open-connection limit, header timeout); aiohttp's
keep-alive timeout closes idle connections.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

from aiohttp import web
from opentelemetry import propagate
from prometheus_client import CONTENT_TYPE_LATEST

from .admission import RETRY_AFTER_S, request_timeout
from .app import Router
from .auth import Authenticator, HttpLimits, RateLimitedLog
from .choices import Choices, validate_prompts
from .errors import (
    AuthenticationError,
    ModelNotFoundError,
    RequestTimeoutError,
    RequestTooLargeError,
    RequestValidationError,
    RouterError,
    UnsupportedMediaTypeError,
)
from .generation import GenerationDelta
from .http_guard import ConnectionGuard, connection_budget, raise_file_limit
from .openai_protocol import Accumulator, Formatter, ParsedRequest, parse_chat, parse_completion
from .tools import with_tools
from .validation import RequestValidator

log = logging.getLogger("splitserve.router")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Parser = Callable[[dict[str, Any], int, str | None], ParsedRequest]

# Seconds a refused request's unread body is drained before the connection closes.
LINGER_S = 1.0
# A JSON string escape of a UTF-16 surrogate: only then can a parsed body hold a lone one.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class HttpApi:
    def __init__(
        self,
        router: Router,
        host: str,
        port: int,
        *,
        auth: Authenticator | None = None,
        limits: HttpLimits | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.router = router
        self.host = host
        self.port = port
        self.auth = auth or Authenticator()
        self.limits = limits or HttpLimits()
        self.ssl_context = ssl_context  # public TLS; None: plain HTTP
        self.guard: ConnectionGuard | None = None
        self.slow_bodies = RateLimitedLog(
            f"answered 408 to request bodies that took over {self.limits.body_timeout_s}s "
            "(--http-body-timeout-s)"
        )
        self._open_paths = {"/health"} if self.auth.metrics_require_key else {"/health", "/metrics"}
        self._runner: web.AppRunner | None = None
        self._server: asyncio.AbstractServer | None = None

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.router.config.max_body_bytes,
            middlewares=[self._errors, self._authenticate],
        )
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        app.router.add_get("/tokenizer_info", self.tokenizer_info)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        return app

    async def start(self) -> None:
        soft, hard = raise_file_limit()
        max_connections = connection_budget(self.limits.max_connections, soft)
        log.info(
            "open-file limit %s (hard %s): at most %d HTTP connections",
            _limit_text(soft),
            _limit_text(hard),
            max_connections,
        )
        self.guard = ConnectionGuard(self.limits, max_connections)
        self._runner = web.AppRunner(
            self.app(),
            handler_cancellation=True,
            access_log=None,
            lingering_time=LINGER_S,
            keepalive_timeout=self.limits.idle_timeout_s,
            shutdown_timeout=2.0,  # in-flight requests were drained before this
        )
        await self._runner.setup()
        loop = asyncio.get_running_loop()
        tls = {"ssl": self.ssl_context, "ssl_handshake_timeout": self.limits.header_timeout_s}
        self._server = await loop.create_server(
            self.guard.wrap(self._runner.server),  # type: ignore[arg-type]
            self.host,
            self.port,
            reuse_address=True,
            **(tls if self.ssl_context is not None else {}),
        )
        scheme = "https" if self.ssl_context is not None else "http"
        log.info("router %s on %s:%d", scheme, self.host, self.bound_port())

    def bound_port(self) -> int:
        """The port actually bound (differs from `port` when that was 0)."""
        if self._server is None or not self._server.sockets:
            return self.port
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()  # no new connections; open ones are the runner's to close
            self._server = None
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

    async def tokenize(self, request: web.Request) -> web.Response:
        """vLLM's shape: {"prompt": text} or {"messages": [...]} -> {"count", "max_model_len",
        "tokens", "token_strs"}; the ids a completion of that input would be given."""
        body, _ = await _read_json(
            request, self.router.config.max_body_bytes, self.limits.body_timeout_s
        )
        ids, strs = tokenize_body(self.router.validator, body)
        return web.json_response(
            {
                "count": len(ids),
                "max_model_len": self.router.model.max_model_len,
                "tokens": ids,
                "token_strs": strs,
            }
        )

    async def detokenize(self, request: web.Request) -> web.Response:
        """vLLM's shape: {"tokens": [ids]} -> {"prompt": text}."""
        body, _ = await _read_json(
            request, self.router.config.max_body_bytes, self.limits.body_timeout_s
        )
        validator = self.router.validator
        _check_model(validator, body)
        tokens = body.get("tokens")
        if tokens is None:
            raise RequestValidationError("invalid_value", "tokens is required", "tokens")
        ids = validator.check_token_ids(tokens, "tokens")
        return web.json_response({"prompt": validator.tokenizer.decode(ids)})

    async def tokenizer_info(self, request: web.Request) -> web.Response:
        """vLLM's /tokenizer_info: what a client needs to tokenize as the server does (with
        /tokenize and /detokenize, lm-evaluation-harness's `remote` tokenizer backend)."""
        tok = self.router.tokenizer
        special = tok.special_tokens_map
        return web.json_response(
            {
                "tokenizer_class": "splitserve.Tokenizer",
                "bos_token": tok.bos_token,
                "eos_token": tok.eos_token,
                "pad_token": special.get("pad_token"),
                "unk_token": special.get("unk_token"),
                "chat_template": tok.chat_template,
                "model_max_length": self.router.model.max_model_len,
                "vocab_size": self.router.model.vocab_size,
            }
        )

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
        tenant = self.auth.authenticate(request.headers.get("Authorization"))  # passed before
        with self.router.admit(api), self.auth.admit(tenant):
            limit, timeout_s = self.router.config.max_body_bytes, self.limits.body_timeout_s
            try:
                body, size = await _read_json(request, limit, timeout_s)
            except RequestTimeoutError:
                self.slow_bodies.hit()
                raise
            parsed = parse(body, size, request.headers.get("Authorization"))
            parsed.raw.tenant = tenant
            param = "prompt" if parsed.prompts is not None else None  # a list: name the one
            validated = await validate_prompts(self.router, parsed.inputs(), param)
            first = validated[0]
            fmt = Formatter(chat, first.request_id, self.router.model.name, parsed.top_logprobs)
            fmt = with_tools(fmt, parsed.tools)  # chat with tools: calls parsed from the text
            # Trace context from the caller's W3C `traceparent` header, if it sent one.
            parent = propagate.extract(dict(request.headers))
            budget_s = request_timeout(request.headers, body)  # X-Request-Timeout, `timeout`
            choices = Choices(self.router, validated)
            deltas = choices.stream(parent, arrival, budget_s)
            async with aclosing(deltas) as stream:
                if parsed.stream.stream:
                    # best_of > n streams too, buffered: its first event comes once every
                    # candidate has finished (router/choices.py), as vLLM does.
                    return await _stream(request, stream, fmt, parsed.stream.include_usage, choices)
                accs = [Accumulator(index=i) for i in range(choices.num_choices)]
                async for delta in stream:
                    accs[delta.index].add(delta)
                return web.json_response(fmt.response(accs, choices.usage))

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """With keys configured every path needs one but /health (and /metrics unless
        `metrics_require_key`): closed by default, so no path is ever left open by mistake."""
        if request.path not in self._open_paths:
            try:
                self.auth.authenticate(request.headers.get("Authorization"))
            except AuthenticationError as e:
                self.router.metrics.requests.labels("http", e.code).inc()
                raise
        return await handler(request)

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
    choices: Choices,
) -> web.StreamResponse:
    # Wait for the first delta before sending headers: routing errors (no worker, overload)
    # still get their own status code instead of a 200 with an error inside.
    first = await anext(deltas, None)
    headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    resp = web.StreamResponse(headers=headers)
    await resp.prepare(request)
    for index in range(choices.num_choices):
        opening = fmt.first_chunk(index)
        if opening is not None:
            await resp.write(_sse(opening))
    try:
        await _write_events(resp, first, deltas, fmt, include_usage, choices)
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
    choices: Choices,
) -> None:
    try:
        while delta is not None:
            await resp.write(_sse(fmt.chunk(delta)))
            delta = await anext(deltas, None)
        if include_usage:
            await resp.write(_sse(fmt.usage_chunk(choices.usage)))
    except RouterError as e:  # after the headers, an error can only be an event
        await resp.write(_sse(e.openai_body()))


async def _read_json(
    request: web.Request, limit: int, timeout_s: float
) -> tuple[dict[str, Any], int]:
    _check_content_type(request)
    length = request.content_length
    if length is not None and length > limit:
        raise RequestTooLargeError(length, limit)  # refused before reading a byte of it
    try:
        async with asyncio.timeout(timeout_s):
            raw = await request.read()  # stops once client_max_size bytes have arrived
    except web.HTTPRequestEntityTooLarge as e:  # chunked: no Content-Length to check first
        raise RequestTooLargeError(None, limit) from e
    except TimeoutError as e:
        raise RequestTimeoutError(timeout_s) from e
    return parse_json_object(raw), len(raw)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object: strict UTF-8, no NaN/Infinity, no lone surrogates."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _bad_json(f"the body is not UTF-8: {e.reason} at byte {e.start}") from e
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except RecursionError as e:
        raise _bad_json("the body is nested too deeply") from e
    except ValueError as e:
        raise _bad_json(f"the body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise _bad_json("the body must be a JSON object")
    if _SURROGATE_ESCAPE.search(raw):  # rare: only then can a string hold a lone surrogate
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise _bad_json("the body has a lone UTF-16 surrogate (e.g. \\ud800)") from e
        except RecursionError as e:
            raise _bad_json("the body is nested too deeply") from e
    return body


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _bad_json(message: str) -> RequestValidationError:
    return RequestValidationError("invalid_json", message)


def _check_content_type(request: web.Request) -> None:
    """JSON, or no Content-Type at all; anything else (a form, text) gets 415."""
    if "Content-Type" not in request.headers:
        return
    # The media type is what comes before any parameters, lower-cased. Not aiohttp's
    # `request.content_type`: it runs the stdlib's MIME parameter parser, which raises
    # IndexError on a header such as ';0*' (an RFC 2231 parameter cut short), a 500.
    ctype = request.headers["Content-Type"].split(";", 1)[0].strip().lower()
    if ctype != "application/json" and not ctype.endswith("+json"):
        raise UnsupportedMediaTypeError(request.headers["Content-Type"])


def _error_response(err: RouterError) -> web.Response:
    resp = web.json_response(err.openai_body(), status=err.http_status)
    if err.http_status == 429:  # shed by admission control, or a worker full: come back later
        resp.headers["Retry-After"] = str(getattr(err, "retry_after", RETRY_AFTER_S))
    if isinstance(err, AuthenticationError):
        resp.headers["WWW-Authenticate"] = "Bearer"
    if isinstance(err, RequestTooLargeError | RequestTimeoutError | UnsupportedMediaTypeError):
        resp.force_close()  # don't keep a connection whose body we won't read
    return resp


def tokenize_body(
    validator: RequestValidator, body: dict[str, Any]
) -> tuple[list[int], list[str] | None]:
    """/tokenize: a prompt (special tokens added unless `add_special_tokens: false`) or chat
    messages through the template (`add_generation_prompt`, default true)."""
    _check_model(validator, body)
    flags = {}
    for name, default in (
        ("add_special_tokens", "prompt" in body),
        ("add_generation_prompt", True),
        ("return_token_strs", False),
    ):
        flags[name] = body.get(name, default)
        if not isinstance(flags[name], bool):
            raise RequestValidationError("invalid_value", f"{name} must be true or false", name)
    prompt, messages = body.get("prompt"), body.get("messages")
    if (prompt is None) == (messages is None):
        raise RequestValidationError("invalid_value", "give a prompt or messages", "prompt")
    if messages is not None:
        turns = validator.chat_turns(messages)
        try:
            text = validator.tokenizer.apply_chat_template(
                turns, add_generation_prompt=flags["add_generation_prompt"]
            )
        except Exception as e:  # a template's raise_exception() rejects the conversation
            raise RequestValidationError(
                "invalid_value", f"the chat template rejected the messages: {e}", "messages"
            ) from e
    elif not isinstance(prompt, str):
        raise RequestValidationError("invalid_value", "prompt must be a string", "prompt")
    else:
        text = prompt
    ids = validator.tokenizer.encode(text, add_special_tokens=flags["add_special_tokens"])
    strs = None
    if flags["return_token_strs"]:
        strs = [validator.tokenizer.decode([t], skip_special_tokens=False) for t in ids]
    return ids, strs


def _check_model(validator: RequestValidator, body: dict[str, Any]) -> None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestValidationError("invalid_value", "model must be a string", "model")
    if not validator.model.matches(model):
        raise ModelNotFoundError(model, validator.model.name)


def _limit_text(n: int) -> str:
    return "unlimited" if n == -1 else str(n)


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"
