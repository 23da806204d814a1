"""AsyncEngine: an LLMEngine on one dedicated thread, driven from asyncio.

The engine is not thread-safe, so every call into it (add, abort, adopt, step) runs on its
thread. The asyncio side sends commands through a queue; outputs come back per request through
asyncio queues, posted with `loop.call_soon_threadsafe`:

    event loop                                  engine thread
    ----------                                  -------------
    add_request / abort / call ──► commands ──► run every queued command, then step()
    RequestStream (asyncio.Queue) ◄──────────── outputs, errors, load snapshots

The thread blocks on the command queue whenever the engine has nothing to do (no busy loop);
once idle for IDLE_TRIM_S after a burst, it gives the heap's free pages back first.
One `EngineThread` does all of an engine's torch work, loading included (`AsyncEngine.load`):
with OpenMP, a thread that starts parallel regions after another thread already has its own
team gets slower regions (cores idle ~12% between them on a 2-core machine), so the thread
that loads the weights must be the one that steps them.
Admission is bounded (requests waiting for their first token, and their prompt tokens):
beyond that `add_request` raises QueueFullError at once. Every ending (finish, abort, a consumer
that walks away, a failed step, shutdown) gives the request's blocks back to the pool.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from splitserve.engine.engine import LLMEngine
from splitserve.engine.outputs import KVExport, RequestOutput
from splitserve.engine.sampling_params import SamplingParams
from splitserve.executors.pipeline.executor import StageUnavailableError
from splitserve.executors.tensor_parallel import ShardGroupError
from splitserve.services import heap
from splitserve.workers.engine_stream import (
    DuplicateRequestError,
    EngineClosedError,
    EngineLoopError,
    LoadSnapshot,
    QueueFullError,
    RequestFailedError,
    RequestStream,
)

if TYPE_CHECKING:
    from splitserve.workers.metrics import WorkerMetrics

__all__ = [
    "AsyncEngine",
    "DuplicateRequestError",
    "EngineClosedError",
    "EngineLoopError",
    "LoadSnapshot",
    "QueueFullError",
    "RequestFailedError",
    "RequestStream",
]

log = logging.getLogger("splitserve")
T = TypeVar("T")

# After this many idle seconds following a burst of steps, the engine thread hands the heap's
# free pages back to the OS (services/heap.py): a worker's resident size falls back to its idle
# size instead of staying at its peak, and a steady stream of requests never pays for it. A
# trim that hands back ~150 MiB takes ~8 ms (measured), which a request arriving just then waits.
IDLE_TRIM_S = 1.0


class EngineThread:
    """One daemon thread that runs the jobs given to it, in order: everything torch does for
    one engine (load, step loop, close) happens on the same OS thread. Not a one-worker
    ThreadPoolExecutor: its thread is joined at interpreter exit, so a step stuck on a dead
    TP peer would hang the worker's exit; a daemon thread doesn't."""

    def __init__(self, name: str = "engine") -> None:
        self._jobs: queue.SimpleQueue[tuple[concurrent.futures.Future, Callable, tuple] | None]
        self._jobs = queue.SimpleQueue()
        self._os_thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._os_thread.start()

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put((fut, fn, args))
        return fut

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.wrap_future(self.submit(fn, *args))

    def stop(self) -> None:
        """No more jobs: the thread ends after the queued ones."""
        self._jobs.put(None)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            fut, fn, args = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:  # handed to whoever waits on the future
                fut.set_exception(exc)


class AsyncEngine:
    def __init__(
        self,
        engine: LLMEngine,
        max_waiting_requests: int = 256,
        max_queued_tokens: int = 256 * 1024,
        metrics: WorkerMetrics | None = None,
        thread: EngineThread | None = None,
        on_broken: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.engine = engine
        # Called on the event loop, once, when a step fails because a TP rank or pipeline
        # stage is gone for good (the executor says it is broken): the engine can't step
        # again, and the worker stops reporting SERVING.
        self.on_broken = on_broken
        self.broken: BaseException | None = None
        self._worker_thread = thread
        self.max_waiting_requests = max_waiting_requests
        self.max_queued_tokens = max_queued_tokens
        self.metrics = metrics
        self.load = LoadSnapshot()
        self._commands: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._ids = itertools.count()
        # event-loop state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, RequestStream] = {}  # live requests by caller id
        self._pending: set[asyncio.Future[Any]] = set()
        self._num_queued = 0
        self._queued_tokens = 0
        self._accepting = False
        self._idle = asyncio.Event()
        # engine-thread state
        self._running: dict[str, RequestStream] = {}  # by engine key
        self._reserved: dict[str, RequestStream] = {}
        self._step_loop: concurrent.futures.Future[None] | None = None  # the step loop, running

    @classmethod
    async def load(cls, factory: Callable[[], LLMEngine], *args: Any, **kwargs: Any) -> AsyncEngine:
        """Build the engine with `factory()` on a new EngineThread, which then steps it."""
        thread = EngineThread()
        try:
            engine = await thread.run(factory)
        except BaseException:
            thread.stop()
            raise
        return cls(engine, *args, thread=thread, **kwargs)

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._idle.set()
        self._publish_load()
        self._worker_thread = self._worker_thread or EngineThread()
        self._step_loop = self._worker_thread.submit(self._run)
        self._accepting = True

    async def drain(self, timeout: float) -> bool:
        """Stop accepting; wait up to `timeout` s for live requests. True if all finished."""
        self._accepting = False
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            log.warning("drain: %d requests still live after %.1fs", len(self._streams), timeout)
            return False
        return True

    async def shutdown(self) -> None:
        """Abort everything still live (their blocks go back), stop the thread."""
        self._accepting = False
        if self._step_loop is None:
            return
        self._commands.put(None)
        loop_done, _ = await asyncio.to_thread(concurrent.futures.wait, [self._step_loop], 30)
        for fut in list(self._pending):
            if not fut.done():
                fut.set_exception(EngineClosedError("engine shut down"))
        self._step_loop = None
        # Tensor-parallel ranks and pipeline stages this engine started go down with it: on
        # the engine thread, unless a step is stuck there.
        worker, self._worker_thread = self._worker_thread, None
        assert worker is not None
        if loop_done:
            await worker.run(self.engine.close)
        else:
            await asyncio.to_thread(self.engine.close)
        worker.stop()

    @property
    def num_live_requests(self) -> int:
        return len(self._streams)

    # ---- requests ----------------------------------------------------------------------------
    async def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        cache_salt: str | None = None,
        export_kv: bool = False,
        resume_token_ids: Sequence[int] = (),
    ) -> RequestStream:
        """Queue a request; its outputs arrive on the returned stream. `resume_token_ids`:
        output already produced elsewhere (LLMEngine.add_request), computed with the prompt."""
        resume = list(resume_token_ids)
        num_tokens = len(prompt_token_ids) + len(resume)  # all of them get prefilled
        self._check_admission(request_id, num_tokens)
        stream = self._register(request_id, len(prompt_token_ids), queued=True, work=num_tokens)
        prompt = list(prompt_token_ids)

        def add(engine: LLMEngine) -> None:
            engine.add_request(stream.key, prompt, params, cache_salt, export_kv, resume)
            self._running[stream.key] = stream

        await self._guarded(stream, add)
        return stream

    async def reserve_prefilled(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        cache_salt: str | None = None,
    ) -> RequestStream:
        """Hold blocks for a prompt whose KV will arrive later (CapacityError if none)."""
        self._check_open(request_id)
        stream = self._register(request_id, len(prompt_token_ids), queued=False)
        prompt = list(prompt_token_ids)

        def reserve(engine: LLMEngine) -> None:
            engine.reserve_prefilled(stream.key, prompt, params, cache_salt)
            self._reserved[stream.key] = stream

        await self._guarded(stream, reserve)
        return stream

    async def complete_prefilled(
        self, stream: RequestStream, kv: KVExport, first_token_id: int
    ) -> bool:
        """Adopt the transferred KV; outputs then flow into `stream`. False if it was aborted
        meanwhile (its stream already holds the abort). Errors release the reservation."""

        def complete(engine: LLMEngine) -> bool:
            if self._reserved.pop(stream.key, None) is None:
                return False
            out = engine.complete_prefilled(stream.key, kv, first_token_id)
            if not out.finished:
                self._running[stream.key] = stream
            self._post_outputs([(stream, out)])
            return True

        return await self.call(complete)

    def cancel_reserved(self, stream: RequestStream) -> None:
        """Give back a reservation whose KV will never come; closes the stream."""
        stream.close()  # the abort command it queues also cancels reservations

    async def abort(self, request_id: str) -> bool:
        """Abort a live request; its stream ends with finish_reason "abort"."""
        stream = self._streams.get(request_id)
        if stream is None:
            return False

        def abort(engine: LLMEngine) -> bool:
            found = self._abort_in_engine(engine, stream.key)
            if found:
                self._post_outputs([(stream, self._aborted_output(stream))])
            return found

        return await self.call(abort)

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run `fn(engine)` on the engine thread and return its result (or raise its error)."""
        if self._step_loop is None or self._loop is None:
            raise EngineClosedError("engine is not running")
        fut: asyncio.Future[T] = self._loop.create_future()
        self._pending.add(fut)
        fut.add_done_callback(self._pending.discard)

        def command() -> None:
            try:
                result = fn(self.engine)
            except Exception as exc:
                self._post(_set_exception, fut, exc)
            else:
                self._post(_set_result, fut, result)

        self._commands.put(command)
        return await fut

    # ---- event-loop bookkeeping ---------------------------------------------------------------
    def _check_open(self, request_id: str) -> None:
        if not self._accepting:
            raise EngineClosedError("this worker is draining or stopped")
        if request_id in self._streams:
            raise DuplicateRequestError(f"request id {request_id!r} is already live")

    def _check_admission(self, request_id: str, num_tokens: int) -> None:
        self._check_open(request_id)
        if self._num_queued >= self.max_waiting_requests:
            raise QueueFullError(f"{self._num_queued} requests already waiting")
        if self._queued_tokens and self._queued_tokens + num_tokens > self.max_queued_tokens:
            raise QueueFullError(f"{self._queued_tokens} prompt tokens already waiting")

    def _register(
        self, request_id: str, num_tokens: int, queued: bool, work: int | None = None
    ) -> RequestStream:
        stream = RequestStream(self, request_id, f"{request_id}#{next(self._ids)}", num_tokens)
        self._streams[request_id] = stream
        self._idle.clear()
        if queued:
            stream.queued = True
            stream.num_queued_tokens = num_tokens if work is None else work
            self._num_queued += 1
            self._queued_tokens += stream.num_queued_tokens
        return stream

    async def _guarded(self, stream: RequestStream, fn: Callable[[LLMEngine], None]) -> None:
        """Run a submission; if it fails or its caller goes away, the stream is closed."""
        try:
            await self.call(fn)
        except BaseException:
            stream.close()
            raise

    def _dequeue(self, stream: RequestStream) -> None:
        if stream.queued:
            stream.queued = False
            self._num_queued -= 1
            self._queued_tokens -= stream.num_queued_tokens

    def _forget(self, stream: RequestStream) -> None:
        self._dequeue(stream)
        if self._streams.get(stream.request_id) is stream:
            del self._streams[stream.request_id]
        if not self._streams:
            self._idle.set()

    def _abort_nowait(self, stream: RequestStream) -> None:
        """Queue an abort without waiting: callable from `finally` in a cancelled task."""

        def command() -> None:
            self._abort_in_engine(self.engine, stream.key)

        self._commands.put(command)

    # ---- engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        busy = trim_owed = False  # trim_owed: steps ran since the heap was last trimmed
        while True:
            wait = 0.0 if busy else IDLE_TRIM_S if trim_owed else None
            ran = self._run_commands(wait)
            if ran is None:
                return
            if not ran and not busy and trim_owed:  # idle for IDLE_TRIM_S
                heap.trim()
                trim_owed = False
            busy = self._step()
            trim_owed |= busy
            if not busy:
                self._publish_load()

    def _run_commands(self, wait: float | None) -> bool | None:
        """Run every queued command, waiting up to `wait` s for the first (None: for ever);
        whether any ran, or None on the stop sentinel."""
        try:
            command = self._commands.get_nowait() if wait == 0 else self._commands.get(timeout=wait)
        except queue.Empty:
            return False
        while command is not None:
            try:
                command()
            except Exception:
                log.exception("engine command failed")
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True
        self._stop_engine()
        return None

    def _step(self) -> bool:
        """One engine step; False when it could do nothing, so the thread may sleep.

        A step that schedules nothing (every waiting request needs blocks that reservations
        hold) can only be unblocked by a command, so sleeping on the queue is safe.
        """
        if not self.engine.has_unfinished_requests():
            return False
        stats = self.engine.stats
        before = (stats.num_steps, stats.num_preemptions)
        start = time.perf_counter()
        try:
            outputs = self.engine.step()
        except (StageUnavailableError, ShardGroupError) as exc:
            # A dead stage or TP rank, not a bug of ours: the error goes out as is
            # (UNAVAILABLE), so the router retries these requests on another replica.
            log.error("parallel step failed; failing %d requests: %s", len(self._running), exc)
            self._fail_running(exc)
            if self.engine.runner.broken is not None:  # not a stage that may answer again
                self._post(self._mark_broken, exc)
            return False
        except Exception as exc:
            log.exception("engine step failed; failing %d running requests", len(self._running))
            self._fail_running(RequestFailedError(f"engine step failed: {exc}"))
            return False
        if self.metrics is not None:
            self.metrics.step_seconds.observe(time.perf_counter() - start)
        deliveries = []
        for out in outputs:
            stream = self._running.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._running[out.request_id]
            out.request_id = stream.request_id
            deliveries.append((stream, out))
        self._publish_load()  # before the outputs, so a finished consumer sees fresh load
        self._post_outputs(deliveries)
        return (stats.num_steps, stats.num_preemptions) != before

    def _mark_broken(self, exc: BaseException) -> None:  # event loop
        if self.broken is None:
            self.broken = exc
            if self.on_broken is not None:
                self.on_broken(exc)

    def _fail_running(self, error: BaseException) -> None:
        failed = list(self._running.items())
        self._running.clear()
        for key, _ in failed:
            self.engine.abort_request(key)
        for _, stream in failed:
            self._post(stream._deliver, error)

    def _stop_engine(self) -> None:
        self._fail_running(EngineClosedError("worker shut down"))
        for key, stream in list(self._reserved.items()):
            self.engine.cancel_reserved(key)
            self._post(stream._deliver, EngineClosedError("worker shut down"))
        self._reserved.clear()
        self._publish_load()

    def _abort_in_engine(self, engine: LLMEngine, key: str) -> bool:
        self._running.pop(key, None)
        self._reserved.pop(key, None)
        return engine.abort_request(key) or engine.cancel_reserved(key)

    @staticmethod
    def _aborted_output(stream: RequestStream) -> RequestOutput:
        return RequestOutput(
            stream.request_id,
            finished=True,
            finish_reason="abort",
            num_prompt_tokens=stream.num_prompt_tokens,
            num_output_tokens=stream.num_output_tokens,
            num_cached_tokens=stream.num_cached_tokens,
        )

    def _post_outputs(self, deliveries: list[tuple[RequestStream, RequestOutput]]) -> None:
        if deliveries:
            self._post(_deliver_all, deliveries)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        # RuntimeError: the loop is closed, so nobody is left to tell.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(fn, *args)

    def _publish_load(self) -> None:
        engine, bm = self.engine, self.engine.block_manager
        sched = engine.scheduler
        outstanding = sum(
            s.num_tokens - s.num_computed_tokens + s.params.max_tokens - s.num_output_tokens
            for s in itertools.chain(sched.running, sched.waiting)
        )
        self.load = LoadSnapshot(
            num_running=len(sched.running),
            num_waiting=len(sched.waiting),
            num_reserved=engine.num_reserved_requests,
            outstanding_tokens=outstanding,
            num_free_blocks=bm.num_free_blocks,
            num_blocks=bm.num_blocks,
            block_size=bm.block_size,
            kv_block_usage=bm.usage,
            kv_slot_usage=bm.slot_usage,
            prefix_hit_rate=bm.stats.hit_rate,
        )
        if self.metrics is not None:
            self.metrics.observe_load(self.load)


def _deliver_all(deliveries: list[tuple[RequestStream, RequestOutput]]) -> None:
    for stream, out in deliveries:
        stream._deliver(out)


def _set_result(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
