"""Admission control and deadlines: a request runs on a decode worker only while it has room,
waits (bounded) when none has, and never outlives its deadline.

    admission = Admission(registry, policy, AdmissionConfig(max_queued_requests=64))
    ticket = await admission.admit(job, work, wait)   # the decode worker's LoadTicket

Room is counted by the router itself, from its own `LoadTicket`s (one per request on a decode
or colocated worker, from admission until its stream ends), against a per-worker limit:
`worker_max_requests`, or by default what the worker reports it can hold (GetLoad): its
`max_num_seqs` running at once plus `waiting_allowance` more (at most its own
`max_waiting_requests`). The allowance is 0 by default: a request waiting inside a worker waits
for a whole other request to finish before its first token (the engine admits one only when a
sequence slot frees), while one waiting here goes to whichever worker frees a slot first, at
the cost of one round trip; so admitted requests keep their time to first token under
overload. Below `max_num_seqs` requests per worker nothing changes. A worker that has not
reported yet has no limit, so the router behaves as it did before it knew. `worker_max_tokens`
optionally bounds the outstanding tokens (prompt work + output budget) on a worker too.

When every healthy decoder is full, the request waits in one FIFO queue of at most
`max_queued_requests` for at most `queue_timeout_s`; a ticket released anywhere (or a worker
joining, coming back, or reporting its capacity) hands the head of the queue a worker. Past
either bound the request gets `QueueFullError`: 429 with `Retry-After` over HTTP,
RESOURCE_EXHAUSTED over gRPC, at once rather than after a long wait. Workers keep bounds of
their own (--max-waiting-requests, --max-queued-tokens); the dispatcher retries their
RESOURCE_EXHAUSTED elsewhere or passes it on as 429.

A request's deadline comes from its caller (the gRPC deadline, or HTTP's `X-Request-Timeout`
header / `timeout` body field, in seconds), capped by the router's --request-timeout; past it
the request ends with `DeadlineExceededError` (504 / DEADLINE_EXCEEDED), and every worker call
made for it carries the time left as its own deadline.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from splitserve.v1 import pb

from .errors import OverloadedError, RequestValidationError, RouterError, UnavailableError
from .policy import Policy, RoutingJob
from .registry import DECODE, LoadTicket, Worker, WorkerRegistry

RETRY_AFTER_S = 1  # what a shed request is told to wait before trying again
TIMEOUT_HEADER = "X-Request-Timeout"
TIMEOUT_FIELD = "timeout"


class QueueFullError(OverloadedError):
    """Every decode worker is full and the router's queue is too (or the wait was too long)."""

    def __init__(self, message: str, retry_after_s: int = RETRY_AFTER_S) -> None:
        super().__init__(message)
        self.retry_after = retry_after_s


class DeadlineExceededError(RouterError):
    """The request's deadline passed before it finished."""

    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504
    error_type = "server_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="deadline_exceeded")


@dataclass(frozen=True)
class Deadline:
    """When a request must be done (time.monotonic()), and the budget it was given."""

    at: float
    budget_s: float

    @classmethod
    def after(cls, seconds: float, start: float | None = None) -> Deadline:
        return cls((time.monotonic() if start is None else start) + seconds, seconds)

    def time_left(self) -> float:
        return self.at - time.monotonic()


@dataclass(frozen=True)
class AdmissionConfig:
    worker_max_requests: int | None = None  # None: from the worker's report
    worker_max_tokens: int | None = None  # None: no bound on outstanding tokens
    waiting_allowance: int = 0  # requests beyond a worker's max_num_seqs it may be sent
    max_queued_requests: int = 64
    queue_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.worker_max_requests is not None and self.worker_max_requests < 1:
            raise ValueError("--worker-max-requests must be at least 1")
        if self.worker_max_tokens is not None and self.worker_max_tokens < 1:
            raise ValueError("--worker-max-tokens must be at least 1")
        if self.waiting_allowance < 0:
            raise ValueError("--worker-waiting-allowance must be >= 0")
        if self.max_queued_requests < 0 or not self.queue_timeout_s >= 0:
            raise ValueError("--max-queued-requests and --queue-timeout-s must be >= 0")


def reported_limit(report: pb.WorkerLoad | None, allowance: int = 0) -> int | None:
    """The requests a worker can take at once by its own report: those it runs at once, plus
    `allowance` waiting (no more than its own queue takes)."""
    if report is None or report.max_num_seqs == 0:
        return None  # not reported (yet, or an older worker): no limit
    if report.max_waiting_requests:
        allowance = min(allowance, report.max_waiting_requests)
    return report.max_num_seqs + allowance


# `wait(future, timeout_s)`: True once the future is done, False on timeout, None when the
# request was stopped from outside first (abort, the router's drain, its deadline).
Wait = Callable[[asyncio.Future[Any], float], Awaitable[bool | None]]
Work = Callable[[Worker], int]  # a request's work (tokens) on a given worker


@dataclass
class _Waiter:
    job: RoutingJob
    work: Work
    future: asyncio.Future[LoadTicket]
    since: float


class Admission:
    def __init__(
        self,
        registry: WorkerRegistry,
        policy: Policy,
        config: AdmissionConfig,
        on_shed: Callable[[str], None] = lambda reason: None,
        on_wait: Callable[[float], None] = lambda seconds: None,
    ) -> None:
        self.registry = registry
        self.policy = policy
        self.config = config
        self.on_shed = on_shed  # metrics: a request refused, by reason
        self.on_wait = on_wait  # metrics: seconds a request queued before it was admitted
        self._queue: deque[_Waiter] = deque()
        registry.listeners.append(self._pump)

    # ---- room ------------------------------------------------------------------------------
    def limit(self, worker: Worker) -> int | None:
        if self.config.worker_max_requests is not None:
            return self.config.worker_max_requests
        return reported_limit(worker.reported, self.config.waiting_allowance)

    def has_room(self, worker: Worker, work: int) -> bool:
        limit = self.limit(worker)
        if limit is not None and worker.load.requests >= limit:
            return False
        cap = self.config.worker_max_tokens
        # An idle worker always takes one request, however large: it could never run otherwise.
        return cap is None or worker.load.requests == 0 or worker.load.tokens + work <= cap

    def try_admit(self, job: RoutingJob, work: Work) -> LoadTicket | None:
        """A ticket on the policy's pick among the healthy decoders with room, or None."""
        open_ = [w for w in self.registry.healthy(DECODE) if self.has_room(w, work(w))]
        if not open_:
            return None
        worker = self.policy.select(open_, job)
        return worker.track(work(worker))

    @property
    def num_queued(self) -> int:
        return len(self._queue)

    # ---- admitting ---------------------------------------------------------------------------
    async def admit(
        self, job: RoutingJob, work: Work, wait: Wait, time_left: float | None = None
    ) -> LoadTicket | None:
        """A ticket on a decode worker with room, waiting in the queue if none has one.

        UnavailableError with no healthy decoder; QueueFullError when the queue is full or the
        wait reached `queue_timeout_s`; None when the request was stopped while it waited, or
        its deadline (`time_left`, which bounds the wait too) passed first: the caller knows
        which and says so.
        """
        if not self.registry.healthy(DECODE):
            raise UnavailableError("no healthy decode or colocated worker")
        if not self._queue:  # first come, first served: nobody may overtake the queue
            ticket = self.try_admit(job, work)
            if ticket is not None:
                return ticket
        cfg = self.config
        if len(self._queue) >= cfg.max_queued_requests:
            self.on_shed("queue_full")
            raise QueueFullError(
                f"every decode worker is at its limit and {len(self._queue)} requests are "
                f"queued (limit {cfg.max_queued_requests}); retry later"
            )
        loop = asyncio.get_running_loop()
        waiter = _Waiter(job, work, loop.create_future(), time.monotonic())
        self._queue.append(waiter)
        bound = cfg.queue_timeout_s if time_left is None else min(cfg.queue_timeout_s, time_left)
        outcome: bool | None = None
        try:
            outcome = await wait(waiter.future, bound)
        finally:
            if waiter in self._queue:
                self._queue.remove(waiter)
            if not outcome:
                _release(waiter.future)  # handed a ticket just as it stopped waiting
                waiter.future.cancel()
        if outcome:
            ticket = waiter.future.result()  # raises what fail_queued set (draining)
            self.on_wait(time.monotonic() - waiter.since)
            return ticket
        if outcome is None or bound < cfg.queue_timeout_s:
            return None  # stopped from outside, or the deadline ended the wait: caller says
        if not self.registry.healthy(DECODE):
            raise UnavailableError("no healthy decode or colocated worker")
        self.on_shed("queue_timeout")
        raise QueueFullError(
            f"no decode worker had room within {cfg.queue_timeout_s:g} s; retry later"
        )

    def fail_queued(self, error: RouterError) -> int:
        """End every queued request with `error` (the router is draining); how many."""
        n = 0
        while self._queue:
            waiter = self._queue.popleft()
            if not waiter.future.done():
                waiter.future.set_exception(error)
                n += 1
        return n

    def _pump(self) -> None:
        """Room may have appeared: hand tickets to the queue's head, in order, while any fit."""
        while self._queue:
            head = self._queue[0]
            if head.future.done():
                self._queue.popleft()
                continue
            ticket = self.try_admit(head.job, head.work)
            if ticket is None:
                return
            self._queue.popleft()
            head.future.set_result(ticket)


def _release(fut: asyncio.Future[LoadTicket]) -> None:
    """Give back the ticket a future holds, if it holds one."""
    if fut.done() and not fut.cancelled() and fut.exception() is None:
        fut.result().release()


# ---- deadlines -----------------------------------------------------------------------------
def request_timeout(headers: Mapping[str, str], body: Mapping[str, Any]) -> float | None:
    """The HTTP caller's timeout in seconds: `X-Request-Timeout` or the body's `timeout`
    (the smaller if both); None if neither. 400 for anything but a positive number."""
    values = []
    header = headers.get(TIMEOUT_HEADER)
    if header is not None:
        try:
            values.append(_positive(float(header.strip()), TIMEOUT_HEADER))
        except ValueError as e:
            raise _bad_timeout(TIMEOUT_HEADER, f"must be a number of seconds: {e}") from None
    field = body.get(TIMEOUT_FIELD)
    if field is not None:
        if isinstance(field, bool) or not isinstance(field, int | float):
            raise _bad_timeout(TIMEOUT_FIELD, "must be a number of seconds")
        try:
            values.append(_positive(float(field), TIMEOUT_FIELD))
        except OverflowError:  # an integer past a float's range
            raise _bad_timeout(TIMEOUT_FIELD, "must be a positive number of seconds") from None
    return min(values) if values else None


def _positive(value: float, name: str) -> float:
    if not math.isfinite(value) or value <= 0:
        raise _bad_timeout(name, f"must be a positive number of seconds; got {value}")
    return value


def _bad_timeout(name: str, message: str) -> RequestValidationError:
    return RequestValidationError("invalid_value", f"{name} {message}", TIMEOUT_FIELD)
