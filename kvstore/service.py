"""The KVStore gRPC servicer: validates at the door, then hands bytes to a backend.

Input is checked before anything is fetched or stored (key count, empty or oversized keys,
payload size, and on Put that each payload really is a KV payload for its key), and a bad
request fails alone with INVALID_ARGUMENT. A backend that fails (Redis down, timed out) turns
into UNAVAILABLE with a message, so callers fall back to recomputing; the server keeps serving.

The kvstore keeps bytes and never needs the mesh secret: workers verify each block's signature
before they use it. Given the secret anyway (`secret`), it also refuses unsigned or badly
signed Puts at the door (INVALID_ARGUMENT), so a forged block never takes space in the store.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import NoReturn, TypeVar

import grpc
from opentelemetry.trace import Span

from splitserve.kvstore.backends import BackendError, KVBackend, verify_values
from splitserve.services.tracing import extract_context, tracer
from splitserve.v1 import pb, rpc
from splitserve.wire.kv_payload import KVPayloadError, verify_payload

log = logging.getLogger("splitserve")
REFUSED_LOG_INTERVAL_S = 10.0  # forged Puts are logged at most this often
T = TypeVar("T")
Ctx = grpc.aio.ServicerContext


@dataclass(frozen=True)
class Limits:
    max_keys: int = 4096  # per Match/Get request, and per Put stream
    max_key_bytes: int = 256  # keys are 32-byte SHA-256 digests; leave room for other hashes
    max_payload_bytes: int = 64 * 1024 * 1024  # per block
    get_batch_keys: int = 32  # keys per backend fetch while a Get streams: bounds memory
    put_batch_bytes: int = 32 * 1024 * 1024  # a Put stream is stored in batches of this size


def check_keys(keys: Sequence[bytes], limits: Limits) -> str | None:
    """Why these keys are not a valid request, or None."""
    if len(keys) > limits.max_keys:
        return f"{len(keys)} keys in one request; the limit is {limits.max_keys}"
    for i, key in enumerate(keys):
        if not key:
            return f"key {i} is empty"
        if len(key) > limits.max_key_bytes:
            return f"key {i} has {len(key)} bytes; the limit is {limits.max_key_bytes}"
    return None


def check_block(block: pb.BlockPayload, index: int, limits: Limits) -> str | None:
    """Why this Put block can't be stored (before its checksum is looked at), or None."""
    if index >= limits.max_keys:
        return f"more than {limits.max_keys} blocks in one Put"
    if block.missing:
        return f"block {index} is marked missing; a Put carries payloads only"
    if len(block.payload) > limits.max_payload_bytes:
        return (
            f"block {index} payload has {len(block.payload)} bytes; "
            f"the limit is {limits.max_payload_bytes}"
        )
    if not block.key:
        return f"block {index} has an empty key"
    if len(block.key) > limits.max_key_bytes:
        return f"block {index} key has {len(block.key)} bytes; the limit is {limits.max_key_bytes}"
    return None


class KVStoreServicer(rpc.KVStoreServicer):
    def __init__(
        self, backend: KVBackend, limits: Limits | None = None, secret: bytes | None = None
    ) -> None:
        self.backend = backend
        self.limits = limits or Limits()
        self.secret = secret
        self._refused_logged_at = -REFUSED_LOG_INTERVAL_S
        self._refused_quiet = 0  # refusals not logged since the last line
        self._backend_down = False  # log a failing backend once, not once per RPC

    async def Match(self, request: pb.MatchRequest, context: Ctx) -> pb.MatchResponse:
        with _span("kvstore.match", context) as sp:
            keys = list(request.keys)
            await self._validate_keys(keys, context)
            num_matched = await self._backend_call(self.backend.match(keys), context)
            sp.set_attributes({"kvstore.num_keys": len(keys), "kvstore.num_matched": num_matched})
            return pb.MatchResponse(num_matched=num_matched)

    async def Get(self, request: pb.GetRequest, context: Ctx) -> AsyncIterator[pb.BlockPayload]:
        # Not the current span: an async generator's context must not leak across its yields.
        span = tracer().start_span("kvstore.get", context=extract_context(context))
        try:
            keys = list(request.keys)
            await self._validate_keys(keys, context)
            num_hits = 0
            step = self.limits.get_batch_keys
            for start in range(0, len(keys), step):
                chunk = keys[start : start + step]
                values = await self._backend_call(self.backend.get_many(chunk), context)
                for key, value in zip(chunk, values, strict=True):
                    num_hits += value is not None
                    yield _block(key, value)
            span.set_attributes({"kvstore.num_keys": len(keys), "kvstore.num_hits": num_hits})
        finally:
            span.end()

    async def Put(
        self, request_iterator: AsyncIterator[pb.BlockPayload], context: Ctx
    ) -> pb.PutResponse:
        with _span("kvstore.put", context) as sp:
            num_stored, index = 0, 0
            batch: list[tuple[bytes, bytes]] = []
            batch_bytes = 0
            async for block in request_iterator:
                if (error := check_block(block, index, self.limits)) is not None:
                    await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, error)
                batch.append((block.key, block.payload))
                batch_bytes += len(block.payload)
                index += 1
                # Store as we go so a long stream never sits in memory whole.
                if batch_bytes >= self.limits.put_batch_bytes:
                    num_stored += await self._store(batch, context)
                    batch, batch_bytes = [], 0
            num_stored += await self._store(batch, context)
            sp.set_attributes({"kvstore.num_blocks": index, "kvstore.num_stored": num_stored})
            return pb.PutResponse(num_stored=num_stored)

    async def Stats(self, request: pb.StatsRequest, context: Ctx) -> pb.StatsResponse:
        with _span("kvstore.stats", context):
            s = await self._backend_call(self.backend.stats(), context)
            fields = ("num_blocks", "num_bytes", "hits", "misses", "puts", "evictions")
            return pb.StatsResponse(backend=s["backend"], **{f: int(s.get(f, 0)) for f in fields})

    async def _store(self, batch: list[tuple[bytes, bytes]], context: Ctx) -> int:
        """Stores a batch whose payloads all prove to be KV payloads for their keys."""
        if not batch:
            return 0
        keys, values = [k for k, _ in batch], [v for _, v in batch]
        valid = await verify_values(keys, values, self.secret)
        if not all(valid):
            i = valid.index(False)
            reason = _payload_error(values[i], keys[i], self.secret)
            self._log_refused(context, keys[i], reason)
            await _abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, f"block {keys[i].hex()}: {reason}"
            )
        return await self._backend_call(self.backend.put_many(batch), context)

    def _log_refused(self, context: Ctx, key: bytes, reason: str) -> None:
        now = time.monotonic()
        if now - self._refused_logged_at < REFUSED_LOG_INTERVAL_S:
            self._refused_quiet += 1
            return
        quiet, self._refused_quiet, self._refused_logged_at = self._refused_quiet, 0, now
        log.warning(
            "kvstore: refused a Put from %s: block %s: %s%s",
            context.peer(), key.hex()[:16], reason,
            f" ({quiet} more refused since the last report)" if quiet else "",
        )  # fmt: skip

    async def _validate_keys(self, keys: Sequence[bytes], context: Ctx) -> None:
        if (error := check_keys(keys, self.limits)) is not None:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, error)

    async def _backend_call(self, awaitable: Awaitable[T], context: Ctx) -> T:
        try:
            result = await awaitable
        except BackendError as exc:
            message = f"kvstore backend unavailable: {exc}"
        except Exception as exc:  # a bug or an unexpected backend error: fail this RPC only
            log.exception("kvstore: backend call failed")
            message = f"kvstore backend failed: {type(exc).__name__}: {exc}"
        else:
            if self._backend_down:
                log.info("kvstore: backend is answering again")
                self._backend_down = False
            return result
        if not self._backend_down:
            log.warning("%s (logged once until it recovers)", message)
            self._backend_down = True
        await _abort(context, grpc.StatusCode.UNAVAILABLE, message)


def _span(name: str, context: Ctx) -> AbstractContextManager[Span]:
    """A span for this RPC, a child of the caller's (trace context in the gRPC metadata)."""
    return tracer().start_as_current_span(name, context=extract_context(context))


def _block(key: bytes, value: bytes | None) -> pb.BlockPayload:
    if value is None:
        return pb.BlockPayload(key=key, missing=True)
    return pb.BlockPayload(key=key, payload=value)


def _payload_error(payload: bytes, key: bytes, secret: bytes | None) -> str:
    try:
        verify_payload(payload, key, secret)
    except KVPayloadError as exc:
        return str(exc)
    return "invalid KV payload"


async def _abort(context: Ctx, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")  # for type checkers
