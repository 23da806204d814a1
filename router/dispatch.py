"""From a validated request to a stream of worker tokens: admit, route, prefill, decode, and
move the request elsewhere when its worker fails.

    async with aclosing(dispatcher.stream(request, slot, deadline=deadline)) as events:
        async for ev in events:      # WorkerTokens: new token ids, logprobs, finish reason
            ...

Per request the dispatcher first admits it on a decode worker with room (router/admission.py:
a bounded queue when all are full, 429 past it), then decides Dynamo-style whether to prefill
remotely: only when the prompt's uncached part on that worker is long (>= `disagg_min_tokens`),
a prefill worker is healthy, and the least loaded prefill worker isn't backed up (outstanding
prefill tokens <= `prefill_queue_max_tokens`). The request's `disaggregate` overrides. A
remote prefill that fails (UNAVAILABLE, full, or hung) is retried on another prefill worker,
and when none is left the decode worker prefills locally. Prefill's first token goes to the
caller as soon as prefill returns it, before the KV hand-off, so the hand-off is not part of
the time to first token; the decode worker is told so (`first_token_sent`) and streams only
the tokens after it (if it cannot adopt the KV, it prefills prompt + that token itself). A
request with several candidates per prompt (`best_of` > 1) waits for the decode worker's first
message instead: its other candidates start then, to find the prompt cached there
(router/choices.py).

Failures and migration. A worker call fails when it returns UNAVAILABLE (the process died, or
is shutting down), when its stream ends without a finish reason, or when the worker hangs:
a health check of it failed while the call got nothing from it (`Worker.wait_down`), or a
stream got no message for `stream_idle_timeout_s`. The call is cancelled, the worker marked
failed, and the request goes to another healthy decode worker:
- before the decode worker relayed a token (prefill's first token may have gone out already),
  afresh (with the same KV lease, if prefill handed one over), at most `decode_retries` times;
  a full worker (RESOURCE_EXHAUSTED) counts the same;
- after tokens were relayed, resumed: prompt + the tokens already relayed are prefilled there
  (`DecodeRequest.resume_token_ids`), and the stream goes on with the next token, so the client
  sees no gap and no duplicate. Greedy output is the same as without the failure, and so is a
  seeded one (the engine seeds each output position on its own). At most `max_migrations`
  times; then UNAVAILABLE, naming every attempt. With no healthy decoder left, a resumed
  request waits (up to the queue timeout) for one to come back.

Deadlines: every worker call's timeout is the time the request has left, and a timer stops the
request when its deadline passes (DeadlineExceededError), wherever it is waiting. The router's
drain stops requests the same way (`CallSlot.interrupt`), so each ends with a clear error.

Load is counted on every path: each worker call holds a `LoadTicket` released in a `finally`
(the decode worker's from admission on), and closing the stream early (stop string, client
gone, abort) cancels the worker's stream, which makes the worker free the request's KV.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from splitserve.engine.guided import spec_to_proto
from splitserve.engine.hashing import block_hashes
from splitserve.services.tracing import inject_metadata
from splitserve.v1 import pb

from .admission import Admission, AdmissionConfig, Deadline, DeadlineExceededError
from .errors import RouterError, UnavailableError, UpstreamError, upstream_error
from .policy import Policy, RoutingJob
from .registry import DECODE, PREFILL, LoadTicket, Worker, WorkerRegistry
from .validation import ValidatedRequest

log = logging.getLogger("splitserve.router")

Metadata = Callable[[], tuple[tuple[str, str], ...]]

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
# A worker answering these is gone or going away (a server stopping cancels its calls).
_GONE_CODES = (UNAVAILABLE, grpc.StatusCode.CANCELLED)
_NO_TIME = 0.001  # a call's timeout when the deadline has (just) passed: fail, don't hang
MIGRATION_POLL_S = 0.1  # how often a resumed request looks for a decoder when none is healthy


@dataclass(frozen=True)
class DispatchConfig:
    kv_namespace: bytes
    block_size: int = 16
    disagg_min_tokens: int = 256
    prefill_queue_max_tokens: int = 8192
    prefill_retries: int = 2  # further prefill workers tried after one failed
    decode_retries: int = 2  # further decode workers tried before the first token
    max_migrations: int = 3  # resumptions elsewhere after tokens were relayed
    prefill_timeout_s: float = 120.0
    request_timeout_s: float = 600.0  # the deadline of a request whose caller set none
    stream_idle_timeout_s: float = 30.0  # a decode stream silent this long: the worker hangs
    control_timeout_s: float = 5.0  # ReleaseKV and the like
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)


@dataclass
class WorkerTokens:
    """One step of a worker's stream, as the router relays it."""

    token_ids: list[int]
    logprobs: list[pb.TokenLogprob] = field(default_factory=list)
    finish_reason: int = pb.FINISH_REASON_UNSPECIFIED
    num_cached_tokens: int | None = None
    prompt_logprobs: list[pb.TokenLogprob] = field(default_factory=list)  # with the first token


@dataclass
class Route:
    decode: Worker
    prefill: Worker | None
    reason: str  # why: requested, no_prefill_workers, short_prompt, prefill_backed_up, ...

    @property
    def mode(self) -> str:
        return "disaggregated" if self.prefill is not None else "local"


@dataclass
class DispatchHooks:
    """Metrics: where requests went, and what went wrong on the way."""

    on_route: Callable[[Route], None] = lambda route: None
    # (phase, reason): phase "prefill" | "before_first_token" | "mid_stream"
    on_migrate: Callable[[str, str], None] = lambda phase, reason: None
    on_shed: Callable[[str], None] = lambda reason: None  # refused: queue_full, queue_timeout
    on_queue_wait: Callable[[float], None] = lambda seconds: None


class CallSlot:
    """The worker call a request is waiting on, so that it can be stopped from outside: by
    Abort (the stream ends with finish reason "abort"), or with an error (the request's
    deadline, the router's drain), which the request then raises."""

    def __init__(self) -> None:
        self.aborted = False
        self.error: RouterError | None = None
        self.call: grpc.aio.Call | None = None
        self._wake: asyncio.Future[None] | None = None

    def abort(self) -> None:
        if not self.stopped:
            self.aborted = True
            self._stop()

    def interrupt(self, error: RouterError) -> None:
        """End the request with `error`, wherever it is (waiting, prefilling, streaming)."""
        if not self.stopped:
            self.error = error
            self._stop()

    @property
    def stopped(self) -> bool:
        return self.aborted or self.error is not None

    def _stop(self) -> None:
        if self.call is not None:
            self.call.cancel()
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def was_aborted(self) -> bool:
        """A CancelledError came from abort/interrupt, not from our own task being cancelled."""
        task = asyncio.current_task()
        return self.stopped and (task is None or not task.cancelling())

    def raise_if_interrupted(self) -> None:
        if self.error is not None:
            raise self.error

    async def wait(self, fut: asyncio.Future[Any], timeout: float) -> bool | None:
        """Wait for `fut`: True once done, False after `timeout` s, None if stopped first."""
        if self.stopped:
            return None
        self._wake = asyncio.get_running_loop().create_future()
        try:
            done, _ = await asyncio.wait(
                {fut, self._wake}, timeout=max(0.0, timeout), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            self._wake.cancel()
            self._wake = None
        if fut in done:
            return True
        return None if self.stopped else False


class _WorkerFailed(Exception):
    """A worker call failed in a way another worker may not: try elsewhere if allowed."""

    def __init__(self, reason: str, why: str, error: RouterError, dead: bool = True) -> None:
        super().__init__(why)
        self.reason = reason  # for metrics: unavailable, health_check, idle_timeout, ...
        self.why = why  # for the log and the final error
        self.error = error  # what the caller gets if the request goes nowhere else
        self.dead = dead  # take the worker out of selection (not for a full one)


class _Watch:
    """Gives up on a call to a worker that hangs: cancels the call when a health check of the
    worker fails while the call has got nothing from it since that check began, or, once the
    call has sent its first message, when it sends nothing for `idle_timeout_s` (None: no such
    bound, e.g. a unary call).

    The idle bound starts with the first message because the time to it is the prompt's
    prefill, which under load (a dead prefill worker's prompts all landing here, a resumed
    request re-prefilling its tokens) can rightly take longer than any gap between two tokens;
    a worker that hangs before its first message still fails its health checks."""

    def __init__(self, call: Any, worker: Worker, idle_timeout_s: float | None) -> None:
        self.call = call
        self.worker = worker
        self.idle_timeout_s = idle_timeout_s
        self.last = time.monotonic()
        self.started = False  # a first message has come: the idle bound applies
        self.reason: str | None = None
        self.why = ""
        self._task = asyncio.get_running_loop().create_task(self._run())

    def touch(self) -> None:
        self.last = time.monotonic()
        self.started = True

    def close(self) -> None:
        self._task.cancel()

    async def _run(self) -> None:
        while True:
            timeout = self.idle_timeout_s  # not started: look again after that long
            if self.idle_timeout_s is not None and self.started:
                timeout = self.last + self.idle_timeout_s - time.monotonic()
                if timeout <= 0:
                    self._give_up("idle_timeout", f"sent nothing for {self.idle_timeout_s:g} s")
                    return
            down = self.worker.wait_down()
            try:
                check_started = await asyncio.wait_for(down, timeout)
            except TimeoutError:
                continue  # see whether the stream really was idle that long
            if self.last < check_started:
                self._give_up("health_check", "failed a health check while silent (hung)")
                return

    def _give_up(self, reason: str, why: str) -> None:
        self.reason, self.why = reason, why
        log.warning("worker %s %s: cancelling its call", self.worker.address, why)
        self.call.cancel()


@dataclass
class _Run:
    """One request's state across its attempts."""

    req: ValidatedRequest
    job: RoutingJob
    slot: CallSlot
    metadata: Metadata
    deadline: Deadline
    ticket: LoadTicket | None = None  # on the decode worker serving it now
    relayed: list[int] = field(default_factory=list)  # output tokens the caller already has
    from_prefill: int = 0  # of those, sent from prefill's response (0 or 1): not decoded yet
    attempts: list[str] = field(default_factory=list)  # "address: what went wrong"

    @property
    def decoded(self) -> bool:
        """A decode worker has relayed tokens."""
        return len(self.relayed) > self.from_prefill

    def time_left(self) -> float:
        left = self.deadline.time_left()
        if left <= 0:
            raise self.deadline_error()
        return left

    def deadline_error(self) -> DeadlineExceededError:
        done = f" after {len(self.relayed)} tokens" if self.relayed else ""
        return DeadlineExceededError(
            f"request {self.req.request_id} did not finish within its deadline of "
            f"{self.deadline.budget_s:g} s{done}"
        )


class Dispatcher:
    def __init__(
        self,
        registry: WorkerRegistry,
        policy: Policy,
        config: DispatchConfig,
        on_route: Callable[[Route], None] | None = None,
        hooks: DispatchHooks | None = None,
    ) -> None:
        self.registry = registry
        self.policy = policy
        self.config = config
        self.hooks = hooks or DispatchHooks()
        if on_route is not None:
            self.hooks.on_route = on_route
        self.admission = Admission(
            registry,
            policy,
            config.admission,
            on_shed=lambda reason: self.hooks.on_shed(reason),
            on_wait=lambda seconds: self.hooks.on_queue_wait(seconds),
        )
        self._background: set[asyncio.Task[None]] = set()

    def job(self, req: ValidatedRequest) -> RoutingJob:
        cfg = self.config
        hashes = block_hashes(
            req.prompt_token_ids, cfg.block_size, cfg.kv_namespace, req.cache_salt
        )
        return RoutingJob(hashes, len(req.prompt_token_ids), cfg.block_size)

    def plan(self, req: ValidatedRequest, job: RoutingJob, decode: Worker | None = None) -> Route:
        """Where the request runs: `decode` (the admitted worker; default: the policy's pick
        among the healthy ones) and, if worth it, a prefill worker."""
        if decode is None:
            decoders = self.registry.healthy(DECODE)
            if not decoders:
                raise UnavailableError("no healthy decode or colocated worker")
            decode = self.policy.select(decoders, job)
        prefillers = self.registry.healthy(PREFILL)
        remote, reason = self._disaggregate(req, job, decode, prefillers)
        prefill = self.policy.select(prefillers, job) if remote else None
        return Route(decode, prefill, reason)

    def _disaggregate(
        self, req: ValidatedRequest, job: RoutingJob, decode: Worker, prefillers: list[Worker]
    ) -> tuple[bool, str]:
        if req.disaggregate is not None:
            if req.disaggregate and not prefillers:
                raise UnavailableError("disaggregate=true but no prefill worker is healthy")
            return req.disaggregate, "requested"
        if not prefillers:
            return False, "no_prefill_workers"
        if job.uncached_tokens(decode) < self.config.disagg_min_tokens:
            return False, "short_prompt"
        if min(w.load.tokens for w in prefillers) > self.config.prefill_queue_max_tokens:
            return False, "prefill_backed_up"
        return True, "long_prompt"

    # ---- one request -------------------------------------------------------------------------
    async def stream(
        self,
        req: ValidatedRequest,
        slot: CallSlot,
        metadata: Metadata = inject_metadata,
        deadline: Deadline | None = None,
    ) -> AsyncIterator[WorkerTokens]:
        """The request's worker tokens. `deadline`: when it must be done; default:
        `request_timeout_s` from now."""
        if deadline is None:
            deadline = Deadline.after(self.config.request_timeout_s)
        run = _Run(req, self.job(req), slot, metadata, deadline)
        timer = asyncio.get_running_loop().call_later(
            max(0.0, deadline.time_left()), lambda: slot.interrupt(run.deadline_error())
        )
        try:
            async for ev in self._stream(run):
                yield ev
        finally:
            timer.cancel()
            if run.ticket is not None:
                run.ticket.release()

    async def _stream(self, run: _Run) -> AsyncIterator[WorkerTokens]:
        req, job, slot = run.req, run.job, run.slot
        max_tokens = req.params.max_tokens
        run.ticket = await self.admission.admit(
            job, lambda w: job.uncached_tokens(w) + max_tokens, slot.wait, run.time_left()
        )
        if run.ticket is None:  # stopped while queued, or out of time
            slot.raise_if_interrupted()
            if slot.aborted:
                yield WorkerTokens([], finish_reason=pb.FINISH_REASON_ABORT)
                return
            raise run.deadline_error()
        route = self.plan(req, job, run.ticket.worker)
        self.hooks.on_route(route)
        first = None
        if route.prefill is not None:
            # None: every prefill worker failed, and the decode worker prefills locally.
            first = await self._prefill(run, route.prefill)
            if first is not None:  # the prompt was computed there, not on the decode worker
                run.ticket.consume(job.uncached_tokens(route.decode))
        route.decode.prefixes.insert(job.block_hashes)  # it will hold the prompt's blocks
        if first is not None and (first.finished or slot.stopped):
            self._release_lease(first)  # nothing to decode: the first token ended it
            slot.raise_if_interrupted()
            yield _first_only(first, slot.aborted)
            return
        decode_req = _decode_request(req)
        if first is not None:
            _hand_off(decode_req, first)
        try:
            if first is not None and req.best_of == 1:
                decode_req.first_token_sent = True
                run.relayed.append(first.first_token_id)
                run.from_prefill = 1
                yield _first_only(first, False)
            async for ev in self._decode(run, decode_req, first):
                yield ev
        finally:
            if first is not None and not run.decoded:  # the lease may never have been pulled
                self._release_lease(first)

    # ---- prefill -----------------------------------------------------------------------------
    async def _prefill(self, run: _Run, worker: Worker) -> pb.PrefillResponse | None:
        """Prefill remotely, trying another worker when one fails; None when no worker could."""
        req, job, slot = run.req, run.job, run.slot
        prefill_req = pb.PrefillRequest(
            request_id=req.worker_request_id,
            prompt_token_ids=req.prompt_token_ids,
            sampling=_sampling_options(req),
            cache_salt=req.cache_salt or "",
        )
        tried: list[Worker] = []
        for _ in range(self.config.prefill_retries + 1):
            try:
                return await self._prefill_once(run, worker, prefill_req)
            except _WorkerFailed as f:
                run.attempts.append(f"{worker.address}: prefill {f.why}")
                log.warning("prefill on %s %s; trying elsewhere", worker.address, f.why)
                if f.dead:
                    self.registry.mark_failed(worker)
                self.hooks.on_migrate("prefill", f.reason)
            if slot.stopped:
                break
            tried.append(worker)
            others = [w for w in self.registry.healthy(PREFILL) if w not in tried]
            if not others:
                break
            worker = self.policy.select(others, job)
        if slot.stopped:
            slot.raise_if_interrupted()
            return pb.PrefillResponse(finished=True)  # aborted: nothing to decode
        return None

    async def _prefill_once(
        self, run: _Run, worker: Worker, prefill_req: pb.PrefillRequest
    ) -> pb.PrefillResponse:
        job, slot = run.job, run.slot
        with self._dispatch(worker, job, job.uncached_tokens(worker)):
            timeout = min(self.config.prefill_timeout_s, run.time_left())
            call = worker.prefill_stub.Prefill(
                prefill_req, timeout=timeout, metadata=run.metadata()
            )
            slot.call = call
            watch = _Watch(call, worker, None)  # no message to wait for: health checks only
            try:
                if slot.stopped:
                    call.cancel()
                return await call
            except asyncio.CancelledError:
                if watch.reason is not None and not _cancelling():
                    raise _WorkerFailed(watch.reason, watch.why, _hung(worker)) from None
                if slot.was_aborted():
                    slot.raise_if_interrupted()
                    return pb.PrefillResponse(finished=True)  # nothing to decode
                raise
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and _expired(run):
                    raise run.deadline_error() from e
                if e.code() in _GONE_CODES:
                    raise _WorkerFailed(
                        "unavailable", _describe(e), upstream_error(e, worker.address)
                    ) from e
                if e.code() == RESOURCE_EXHAUSTED:  # its leases or queue are full: not dead
                    raise _WorkerFailed(
                        "worker_full", _describe(e), upstream_error(e, worker.address), dead=False
                    ) from e
                raise upstream_error(e, worker.address) from e
            finally:
                watch.close()
                slot.call = None

    # ---- decode ------------------------------------------------------------------------------
    async def _decode(
        self, run: _Run, decode_req: pb.DecodeRequest, first: pb.PrefillResponse | None
    ) -> AsyncIterator[WorkerTokens]:
        """Stream from the decode worker; when it fails, go on elsewhere (module docstring)."""
        tried: list[Worker] = []
        dead: list[Worker] = []
        retries = migrations = 0
        while True:
            assert run.ticket is not None
            worker = run.ticket.worker
            resumed = len(decode_req.resume_token_ids) > 0
            try:
                async for ev in self._decode_once(run, worker, decode_req):
                    if first is not None and not resumed:
                        # The prefill worker knows the prompt's real cache hit; to the decode
                        # worker the whole prompt arrived as KV.
                        ev.num_cached_tokens = first.num_cached_tokens
                        if not run.relayed and not ev.prompt_logprobs:  # prefill computed them
                            ev.prompt_logprobs = list(first.prompt_logprobs)
                    if not ev.token_ids and not ev.finish_reason:
                        continue  # the first message of a hand-off whose token went out
                    run.relayed += ev.token_ids
                    yield ev
                return
            except _WorkerFailed as f:
                failure = f
            run.attempts.append(f"{worker.address}: {failure.why}")
            tried.append(worker)
            if failure.dead:
                self.registry.mark_failed(worker)
                dead.append(worker)
            if run.decoded:
                migrations += 1
                phase, allowed = "mid_stream", migrations <= self.config.max_migrations
            else:
                retries += 1
                phase, allowed = "before_first_token", retries <= self.config.decode_retries
            if not allowed:
                raise self._gave_up(run, failure, phase)
            ticket = await self._next_decoder(run, tried, dead, wait=bool(run.relayed))
            if ticket is None and run.slot.aborted:
                yield WorkerTokens([], finish_reason=pb.FINISH_REASON_ABORT)
                return
            if ticket is None:
                if run.relayed:
                    raise self._gave_up(run, failure, phase, "no other decode worker is healthy")
                raise failure.error
            log.warning(
                "request %s: decode on %s %s; %s on %s",
                run.req.request_id, worker.address, failure.why,
                f"resuming after {len(run.relayed)} tokens" if run.decoded else "retrying",
                ticket.worker.address,
            )  # fmt: skip
            self.hooks.on_migrate(phase, failure.reason)
            run.ticket.release()
            run.ticket = ticket
            if run.decoded:  # the KV is redone there from prompt + what was relayed
                decode_req = _decode_request(run.req)
                decode_req.resume_token_ids.extend(run.relayed)
                decode_req.sampling.ClearField("prompt_logprobs")  # relayed with the first

    def _gave_up(
        self, run: _Run, failure: _WorkerFailed, phase: str, why: str | None = None
    ) -> RouterError:
        if phase == "before_first_token" and why is None:
            return failure.error  # nothing was sent: the worker's own status says it best
        limit = (
            f"after {len(run.attempts)} attempts"
            if why is None
            else f"{why} after {len(run.attempts)} attempts"
        )
        return UnavailableError(
            f"request {run.req.request_id} failed {limit} ({len(run.relayed)} tokens sent): "
            + "; ".join(run.attempts)
        )

    async def _next_decoder(
        self, run: _Run, tried: list[Worker], dead: list[Worker], wait: bool
    ) -> LoadTicket | None:
        """A ticket on another healthy decode worker, one with room preferred (a request that
        is already running is never refused for room). With `wait`, a worker that failed for
        this request may serve it again once a health check has passed, and when none is
        healthy this waits for one, up to the queue timeout and the deadline."""
        limit = time.monotonic() + self.config.admission.queue_timeout_s
        job = run.job
        # Prefill the uncached prompt and the relayed tokens, then the rest of the output.
        work_left = run.req.params.max_tokens

        def work(w: Worker) -> int:
            return job.uncached_tokens(w) + work_left

        while True:
            healthy = self.registry.healthy(DECODE)
            # A dead worker that is healthy again has passed a check since it failed.
            fresh = [w for w in healthy if w not in tried or (wait and w in dead)]
            if fresh:
                roomy = [w for w in fresh if self.admission.has_room(w, work(w))]
                worker = self.policy.select(roomy or fresh, job)
                return self._dispatch(worker, job, work(worker))
            if not wait or time.monotonic() >= limit:
                return None
            await run.slot.wait(asyncio.get_running_loop().create_future(), MIGRATION_POLL_S)
            if run.slot.stopped:
                run.slot.raise_if_interrupted()
                return None
            run.time_left()  # raises once the deadline has passed

    async def _decode_once(
        self, run: _Run, worker: Worker, decode_req: pb.DecodeRequest
    ) -> AsyncIterator[WorkerTokens]:
        slot = run.slot
        assert run.ticket is not None
        ticket = run.ticket
        # The ticket holds the prompt work (the uncached prompt and any resumed output, which
        # the worker prefills first) and the output still to come; the prompt part is done
        # with the first response.
        output_work = decode_req.sampling.max_tokens - len(decode_req.resume_token_ids)
        prompt_work = max(0, ticket.tokens - output_work)
        call = worker.decode_stub.Generate(
            decode_req, timeout=run.time_left(), metadata=run.metadata()
        )
        slot.call = call
        watch = _Watch(call, worker, self.config.stream_idle_timeout_s)
        finished = False
        check_first = decode_req.first_token_sent  # the caller has the first token already
        try:
            if slot.stopped:
                call.cancel()
            async for resp in call:
                watch.touch()
                ticket.consume(prompt_work + len(resp.token_ids))
                prompt_work = 0
                cached = resp.usage.cached_prompt_tokens if resp.HasField("usage") else None
                finished = resp.finish_reason != pb.FINISH_REASON_UNSPECIFIED
                token_ids, logprobs = list(resp.token_ids), list(resp.logprobs)
                if check_first and not resp.first_token_withheld:
                    del token_ids[:1], logprobs[:1]  # a worker that predates the field sent it
                check_first = False
                yield WorkerTokens(
                    token_ids, logprobs, resp.finish_reason, cached, list(resp.prompt_logprobs)
                )
                if finished:
                    return
        except asyncio.CancelledError:
            if watch.reason is not None and not _cancelling():
                raise _WorkerFailed(watch.reason, watch.why, _hung(worker)) from None
            if not slot.was_aborted():
                raise
            slot.raise_if_interrupted()
            yield WorkerTokens([], finish_reason=pb.FINISH_REASON_ABORT)
            return
        except grpc.aio.AioRpcError as e:
            raise self._classify(run, worker, e) from e
        finally:
            # No-op when the stream ended; otherwise the worker sees CANCELLED and frees KV.
            watch.close()
            call.cancel()
            slot.call = None
        if not finished:
            raise _WorkerFailed(
                "stream_incomplete",
                "ended its stream without finishing the request",
                UpstreamError(
                    grpc.StatusCode.INTERNAL,
                    f"worker {worker.address} ended the stream without finishing",
                ),
            )

    def _classify(self, run: _Run, worker: Worker, e: grpc.aio.AioRpcError) -> Exception:
        """A failed decode call: an error for the caller, or a failure to try elsewhere."""
        code = e.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and _expired(run):
            return run.deadline_error()
        error = upstream_error(e, worker.address)
        if run.relayed:
            error = UpstreamError(
                code, f"worker {worker.address} failed mid-stream: {e.details() or code.name}"
            )
        if code in _GONE_CODES:
            return _WorkerFailed("unavailable", _describe(e), error)
        if code == RESOURCE_EXHAUSTED:  # its KV pool or queue is full right now: not dead
            return _WorkerFailed("worker_full", _describe(e), error, dead=False)
        return error

    # ---- bookkeeping -------------------------------------------------------------------------
    def _dispatch(self, worker: Worker, job: RoutingJob, work: int) -> LoadTicket:
        """Count the work on the worker, and note that it will hold the prompt's blocks.

        `work` is measured before the note, or every prompt would look cached already.
        """
        worker.prefixes.insert(job.block_hashes)
        return worker.track(work)

    def _release_lease(self, first: pb.PrefillResponse) -> None:
        """Give back a KV lease decode will never pull; best effort (leases also expire)."""
        if not first.HasField("kv") or not first.kv.lease_id:
            return
        worker = next(
            (w for w in self.registry.workers if w.address == first.kv.prefill_address), None
        )
        if worker is None:
            return
        task = asyncio.create_task(self._release(worker, first.kv.lease_id))
        self._background.add(task)  # keep a reference until done
        task.add_done_callback(self._background.discard)

    async def _release(self, worker: Worker, lease_id: str) -> None:
        try:
            await worker.prefill_stub.ReleaseKV(
                pb.ReleaseKVRequest(lease_id=lease_id),
                timeout=self.config.control_timeout_s,
                metadata=inject_metadata(),
            )
        except grpc.aio.AioRpcError as e:
            log.debug("ReleaseKV %s on %s: %s", lease_id, worker.address, e.code().name)


def _cancelling() -> bool:
    """Our own task is being cancelled (the caller went away): never retry then."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _expired(run: _Run) -> bool:
    return run.deadline.time_left() <= 0.05  # the call's timeout was the time left


def _hung(worker: Worker) -> UpstreamError:
    return UpstreamError(UNAVAILABLE, f"worker {worker.address} stopped answering")


def _describe(e: grpc.aio.AioRpcError) -> str:
    return f"failed: {e.code().name}: {e.details() or ''}".rstrip(": ")


def _first_only(first: pb.PrefillResponse, aborted: bool) -> WorkerTokens:
    if aborted:
        return WorkerTokens([], finish_reason=pb.FINISH_REASON_ABORT)
    logprobs = [first.first_logprob] if first.HasField("first_logprob") else []
    return WorkerTokens(
        [first.first_token_id],
        logprobs,
        first.finish_reason,
        first.num_cached_tokens,
        list(first.prompt_logprobs),
    )


def _hand_off(decode_req: pb.DecodeRequest, first: pb.PrefillResponse) -> None:
    """The decode worker pulls the KV and streams every token, the first one included."""
    decode_req.kv.CopyFrom(first.kv)
    decode_req.first_token_id = first.first_token_id
    if first.HasField("first_logprob"):
        decode_req.first_logprob.CopyFrom(first.first_logprob)


def _decode_request(req: ValidatedRequest) -> pb.DecodeRequest:
    return pb.DecodeRequest(
        request_id=req.worker_request_id,
        prompt_token_ids=req.prompt_token_ids,
        sampling=_sampling_options(req),
        cache_salt=req.cache_salt or "",
    )


def _sampling_options(req: ValidatedRequest) -> pb.SamplingOptions:
    """Everything but stop strings: workers never see text, the router matches those."""
    p = req.params
    opts = pb.SamplingOptions(
        max_tokens=p.max_tokens,
        min_tokens=p.min_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        min_p=p.min_p,
        repetition_penalty=p.repetition_penalty,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        stop_token_ids=p.stop_token_ids,
        ignore_eos=p.ignore_eos,
    )
    if p.seed is not None:
        opts.seed = p.seed
    if p.logprobs is not None:
        opts.logprobs = p.logprobs
    if p.prompt_logprobs is not None:
        opts.prompt_logprobs = p.prompt_logprobs
    for token_id, bias in p.logit_bias:
        opts.logit_bias[token_id] = bias
    spec_to_proto(p.guided, opts)
    return opts
