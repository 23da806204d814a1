"""What the engine loop hands the asyncio side: per-request output streams, load, errors.

A `RequestStream` lives on the event loop. The engine thread never touches it directly: it
posts outputs with `loop.call_soon_threadsafe(stream._deliver, ...)`, and the stream tells its
owner (the AsyncEngine) when it ends, or when its consumer walks away, so the request can be
aborted and its blocks returned.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from splitserve.engine.engine import RequestError
from splitserve.engine.outputs import RequestOutput

if TYPE_CHECKING:
    from splitserve.workers.metrics import WorkerMetrics


class StreamOwner(Protocol):
    metrics: WorkerMetrics | None

    def _abort_nowait(self, stream: RequestStream) -> None: ...
    def _forget(self, stream: RequestStream) -> None: ...
    def _dequeue(self, stream: RequestStream) -> None: ...


class EngineLoopError(Exception):
    """Base of the errors the loop adds on top of the engine's RequestError family."""


class QueueFullError(EngineLoopError):
    """Too many requests (or prompt tokens) waiting: maps to RESOURCE_EXHAUSTED."""


class EngineClosedError(EngineLoopError):
    """Draining or shut down: maps to UNAVAILABLE (the caller should go elsewhere)."""


class RequestFailedError(EngineLoopError):
    """The engine failed while running this request: maps to INTERNAL."""


class DuplicateRequestError(RequestError):
    """A live request already has this id: maps to ALREADY_EXISTS."""


@dataclass(frozen=True)
class LoadSnapshot:
    """What the engine thread last published; read from any thread without locking."""

    num_running: int = 0
    num_waiting: int = 0
    num_reserved: int = 0
    outstanding_tokens: int = 0
    num_free_blocks: int = 0
    num_blocks: int = 0
    block_size: int = 0
    kv_block_usage: float = 0.0
    kv_slot_usage: float = 0.0
    prefix_hit_rate: float = 0.0


class RequestStream:
    """One request's outputs, consumed on the event loop. Close it when done (or use `with`)."""

    def __init__(self, owner: StreamOwner, request_id: str, key: str, num_prompt_tokens: int):
        self.request_id = request_id
        self.key = key  # the engine's id: unique per submission, so a reused id never mixes
        self.num_prompt_tokens = num_prompt_tokens
        self.num_queued_tokens = num_prompt_tokens  # what it counts against the queue bound
        self.num_output_tokens = 0
        self.num_cached_tokens = 0
        self.finished = False
        self.queued = False  # counted against the admission bounds until its first output
        self._owner = owner
        self._items: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._start = time.monotonic()
        self._last: float | None = None

    async def next(self) -> RequestOutput:
        """The next output, with every other already-arrived one merged into it."""
        item = await self._items.get()
        if isinstance(item, BaseException):
            raise item
        while not item.finished and not self._items.empty():
            more = self._items.get_nowait()
            if isinstance(more, BaseException):
                self._items.put_nowait(more)  # nothing else can arrive after an error
                break
            item.merge(more)
        return item

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished and self._items.empty():
            raise StopAsyncIteration
        return await self.next()

    def close(self) -> None:
        """Stop the request if it is still live; safe to call any number of times."""
        if not self.finished:
            self._owner._abort_nowait(self)
            self._owner._forget(self)
            self.finished = True

    def __enter__(self) -> RequestStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- event-loop side of delivery -------------------------------------------------------
    def _deliver(self, item: RequestOutput | BaseException) -> None:
        if self.finished:
            return  # closed by its consumer: nobody is listening
        if isinstance(item, RequestOutput):
            self._observe(item)
        self._items.put_nowait(item)
        if isinstance(item, BaseException) or item.finished:
            self._owner._forget(self)
            self.finished = True
        elif self.queued:
            self._owner._dequeue(self)

    def _observe(self, out: RequestOutput) -> None:
        self.num_output_tokens = max(self.num_output_tokens, out.num_output_tokens)
        self.num_cached_tokens = out.num_cached_tokens or self.num_cached_tokens
        metrics = self._owner.metrics
        if metrics is None or not out.new_token_ids:
            return
        now = time.monotonic()
        if self._last is None:
            metrics.ttft.observe(now - self._start)
        else:
            metrics.itl.observe((now - self._last) / len(out.new_token_ids))
        self._last = now
