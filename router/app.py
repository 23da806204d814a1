"""The router's core, shared by the gRPC and HTTP front doors.

    router = Router(RouterConfig(decode=("127.0.0.1:50071",)))
    await router.start()
    with router.admit("grpc"):                    # bounded concurrency; counts the outcome
        request = await router.validate(raw)      # the one validator
        async for delta in router.generate(request, timeout_s=caller_timeout):
            ...
    await router.drain(30.0)                      # on SIGTERM: see `drain`

The router owns the tokenizer and block hashing only; it never loads weights. Admission
control, deadlines and migration live in router/admission.py and router/dispatch.py; their
flags are added by `add_reliability_arguments`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing, contextmanager
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.context import Context

from splitserve.engine.config import kv_cache_key
from splitserve.engine.hashing import kv_namespace
from splitserve.model.loader import Checkpoint, ModelLoadError, open_checkpoint
from splitserve.services.tracing import inject_metadata, tracer

from .admission import AdmissionConfig, Deadline
from .dispatch import CallSlot, DispatchConfig, Dispatcher, DispatchHooks, Metadata
from .errors import OverloadedError, RequestValidationError, RouterError, UnavailableError
from .generation import GenerationDelta, generate
from .metrics import RouterMetrics
from .policy import DEFAULT_ABS_THRESHOLD, DEFAULT_REL_THRESHOLD, make_policy
from .registry import WorkerRegistry
from .validation import (
    DEFAULT_MAX_N,
    GenerateInput,
    ModelInfo,
    RequestValidator,
    ValidatedRequest,
)

log = logging.getLogger("splitserve.router")

MIB = 1024 * 1024
# After the drain window, streams still open are ended with an error; this long is left for
# them to write it (an SSE error event and [DONE], or the gRPC status) before the server stops.
CUT_GRACE_S = 5.0


@dataclass(frozen=True)
class RouterConfig:
    model: str | None = None  # None: the default model (its tokenizer and config only)
    served_model_name: str | None = None  # default: the checkpoint's name
    max_model_len: int | None = None  # default: the model's context
    prefill: tuple[str, ...] = ()
    decode: tuple[str, ...] = ()
    colocated: tuple[str, ...] = ()
    policy: str = "prefix_aware"
    balance_abs_tokens: int = DEFAULT_ABS_THRESHOLD
    balance_rel: float = DEFAULT_REL_THRESHOLD
    disagg_min_tokens: int = 256
    prefill_queue_max_tokens: int = 8192
    prefill_retries: int = 2
    decode_retries: int = 2  # other decode replicas tried when one fails before any token
    kv_dtype: str = "float32"  # must match the workers' --dtype, or no prefix ever matches
    kv_cache_dtype: str = "auto"  # and their --kv-cache-dtype
    block_size: int = 16  # must match the workers' --block-size
    max_inflight: int = 256
    max_body_bytes: int = MIB
    max_n: int = DEFAULT_MAX_N  # choices per prompt (n and best_of); above it, 400
    health_interval_s: float = 2.0
    drop_after_failures: int = 3  # checks failed in a row before a registered worker is dropped
    request_timeout_s: float = 600.0  # a request's deadline: the caller's, capped by this
    max_migrations: int = 3  # resumptions on another decode worker after tokens were sent
    stream_idle_timeout_s: float = 30.0  # a decode stream silent this long: its worker hangs
    worker_max_requests: int | None = None  # None: from each worker's reported capacity
    worker_max_tokens: int | None = None  # None: no bound on a worker's outstanding tokens
    worker_waiting_allowance: int = 0  # requests past a worker's max_num_seqs it may be sent
    max_queued_requests: int = 64  # waiting for a decode worker with room; more get 429
    queue_timeout_s: float = 10.0  # longest such wait; then 429


class Router:
    def __init__(self, config: RouterConfig, checkpoint: Checkpoint | None = None) -> None:
        self.config = config
        ckpt = checkpoint or open_checkpoint(config.model)
        if ckpt.tokenizer is None:
            raise ModelLoadError(f"{ckpt.path} has no tokenizer; the router needs one")
        self.tokenizer = ckpt.tokenizer
        context = ckpt.config.max_position_embeddings
        self.model = ModelInfo(
            name=config.served_model_name or ckpt.config.name,
            max_model_len=min(config.max_model_len or context, context),
            vocab_size=ckpt.config.vocab_size,
            aliases=(ckpt.config.name,),
        )
        self.created = int(time.time())
        self.validator = RequestValidator(
            self.model, self.tokenizer, config.max_body_bytes, config.max_n
        )
        self.workers = WorkerRegistry(
            config.prefill,
            config.decode,
            config.colocated,
            config.health_interval_s,
            drop_after_failures=config.drop_after_failures,
        )
        policy = make_policy(config.policy, config.balance_abs_tokens, config.balance_rel)
        self.metrics = RouterMetrics(self.workers, policy.name)
        admission = AdmissionConfig(
            worker_max_requests=config.worker_max_requests,
            worker_max_tokens=config.worker_max_tokens,
            waiting_allowance=config.worker_waiting_allowance,
            max_queued_requests=config.max_queued_requests,
            queue_timeout_s=config.queue_timeout_s,
        )
        dispatch = DispatchConfig(
            # Exactly the workers' namespace: the model id is the checkpoint's name.
            kv_namespace=kv_namespace(
                ckpt.config.name,
                kv_cache_key(config.kv_dtype, config.kv_cache_dtype),
                config.block_size,
            ),
            block_size=config.block_size,
            disagg_min_tokens=config.disagg_min_tokens,
            prefill_queue_max_tokens=config.prefill_queue_max_tokens,
            prefill_retries=config.prefill_retries,
            decode_retries=config.decode_retries,
            max_migrations=config.max_migrations,
            request_timeout_s=config.request_timeout_s,
            stream_idle_timeout_s=config.stream_idle_timeout_s,
            admission=admission,
        )
        hooks = DispatchHooks(
            on_route=self.metrics.observe_route,
            on_migrate=self.metrics.observe_migration,
            on_shed=self.metrics.observe_shed,
            on_queue_wait=self.metrics.queue_wait.observe,
        )
        self.dispatcher = Dispatcher(self.workers, policy, dispatch, hooks=hooks)
        self.metrics.bind_admission(self.dispatcher.admission)
        # (tenant, request id) -> its slot: request ids are the caller's, unique per tenant
        self.active: dict[tuple[str | None, str], CallSlot] = {}
        self.draining = False
        self.cut = False  # the drain window is over: whatever still runs is being ended
        self.num_inflight = 0

    # ---- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        """Check every worker once, so the first request already sees the healthy ones."""
        await self.workers.check_all()
        self.workers.start()

    async def drain(self, timeout_s: float, grace_s: float = CUT_GRACE_S) -> int:
        """Stop admitting (503), let the admitted requests finish for up to `timeout_s`, then
        end every one still running with UNAVAILABLE (gRPC) / an error event and [DONE] (SSE)
        and give them `grace_s` to say so. Returns how many were cut.

        Requests still queued for a decode worker get 503 at once (nothing ran for them yet,
        so they can go elsewhere now rather than after the drain).
        """
        self.draining = True
        queued = self.dispatcher.admission.fail_queued(
            UnavailableError("the router is shutting down; retry elsewhere")
        )
        if queued:
            log.info("drain: %d queued requests refused", queued)
        if not await self._wait_idle(timeout_s):
            self.cut = True
            slots = list(self.active.values())
            log.warning(
                "drain: %d requests still running after %.0f s; ending them", len(slots), timeout_s
            )
            error = UnavailableError(
                f"the router is shutting down: the stream was ended after a {timeout_s:g} s "
                "drain; retry the request"
            )
            for slot in slots:
                slot.interrupt(error)
            if not await self._wait_idle(grace_s):
                log.warning("drain: %d requests did not end in time", self.num_inflight)
            return len(slots)
        return 0

    async def _wait_idle(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.num_inflight:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def close(self) -> None:
        await self.workers.close()

    # ---- requests ---------------------------------------------------------------------------
    @contextmanager
    def admit(self, api: str) -> Iterator[None]:
        """Bounded concurrency, failing fast, and the outcome counted on every exit path."""
        status = "ok"
        try:
            if self.draining:
                raise UnavailableError("the router is shutting down")
            if self.num_inflight >= self.config.max_inflight:
                raise OverloadedError(
                    f"{self.num_inflight} requests in flight (limit {self.config.max_inflight})"
                )
        except RouterError as e:
            self.metrics.requests.labels(api, e.code or "error").inc()
            raise
        self.num_inflight += 1
        self.metrics.in_flight.inc()
        try:
            yield
        except RouterError as e:
            status = e.code or "error"
            raise
        except (asyncio.CancelledError, GeneratorExit, ConnectionError):
            status = "cancelled"
            raise
        except Exception:
            status = "internal_error"
            raise
        finally:
            self.num_inflight -= 1
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(api, status).inc()

    async def validate(self, raw: GenerateInput) -> ValidatedRequest:
        return await self.validator.validate(raw)

    async def generate(
        self,
        request: ValidatedRequest,
        parent: Context | None = None,
        arrival: float | None = None,
        timeout_s: float | None = None,
    ) -> AsyncIterator[GenerationDelta]:
        """Deltas of one request; closing the iterator early cancels the worker's stream.

        `arrival` (time.monotonic()) is when the front door got the request: TTFT counts
        from there, validation and tokenization included. `timeout_s`: the caller's own
        deadline, from arrival (gRPC's, or HTTP's X-Request-Timeout); capped by
        `request_timeout_s`. Past it the request ends with DEADLINE_EXCEEDED / 504.
        """
        if self.cut:
            raise UnavailableError("the router is shutting down")
        rid = request.request_id
        key = (request.tenant, rid)
        if key in self.active:
            raise RequestValidationError(
                "duplicate_request_id", f"request {rid!r} is already running", "request_id"
            )
        slot = self.active[key] = CallSlot()
        span = tracer().start_span("router.generate", context=parent)
        span.set_attribute("splitserve.request_id", rid)
        span.set_attribute("splitserve.prompt_tokens", len(request.prompt_token_ids))
        self.metrics.prompt_tokens.inc(len(request.prompt_token_ids))
        start = last = arrival if arrival is not None else time.monotonic()
        limit = self.config.request_timeout_s
        deadline = Deadline.after(limit if timeout_s is None else min(timeout_s, limit), start)
        first = True
        try:
            deltas = generate(
                self.dispatcher, self.tokenizer, request, slot, _metadata(span), deadline
            )
            async with aclosing(deltas) as stream:
                async for delta in stream:
                    now = time.monotonic()
                    if delta.token_ids:
                        self._observe_tokens(len(delta.token_ids), now - last, first)
                        first, last = False, now
                    yield delta
            self.metrics.e2e.observe(time.monotonic() - start)
        except RouterError as e:
            span.set_status(trace.StatusCode.ERROR, e.message)
            raise
        finally:
            del self.active[key]
            span.end()

    def _observe_tokens(self, num_tokens: int, gap_s: float, first: bool) -> None:
        self.metrics.generation_tokens.inc(num_tokens)
        if first:
            self.metrics.ttft.observe(gap_s)
        else:
            self.metrics.itl.observe(gap_s / num_tokens)

    def abort(self, request_id: str, tenant: str | None = None) -> bool:
        """Abort the caller's own request `request_id` (`tenant`: the caller's), and with it
        every choice of a request with several (router/choices.py: `<id>-<i>-<j>`)."""
        slot = self.active.get((tenant, request_id))
        if slot is not None:
            slot.abort()
            return True
        choice = re.compile(re.escape(request_id) + r"-\d+-\d+")
        slots = [s for (t, rid), s in self.active.items() if t == tenant and choice.fullmatch(rid)]
        for s in slots:
            s.abort()
        return bool(slots)


def _metadata(span: trace.Span) -> Metadata:
    """Outgoing-call metadata carrying this request's span (its context, not the caller's)."""

    def metadata() -> tuple[tuple[str, str], ...]:
        with trace.use_span(span, end_on_exit=False):
            return inject_metadata()

    return metadata


# ---- flags ------------------------------------------------------------------------------------
def add_reliability_arguments(p: argparse.ArgumentParser) -> None:
    """Admission control, deadlines and migration (router/admission.py, router/dispatch.py)."""
    d = RouterConfig()
    g = p.add_argument_group(
        "admission and failures (defaults behave as no limit at all under light load)"
    )
    g.add_argument(
        "--worker-max-requests",
        type=int,
        default=None,
        metavar="N",
        help="requests in flight per decode worker before new ones queue at the router "
        "(default: from each worker's report: its --max-num-seqs, plus the allowance below)",
    )
    g.add_argument(
        "--worker-waiting-allowance",
        type=int,
        default=d.worker_waiting_allowance,
        metavar="N",
        help="with the default limit: requests a decode worker may be sent beyond its "
        "--max-num-seqs, to wait there; they wait for a whole request to finish first, so "
        "the default keeps them here (default: %(default)s)",
    )
    g.add_argument(
        "--worker-max-tokens",
        type=int,
        default=None,
        metavar="N",
        help="outstanding tokens (prompt work + output budget) per decode worker before new "
        "requests queue (default: no such bound)",
    )
    g.add_argument(
        "--max-queued-requests",
        type=int,
        default=d.max_queued_requests,
        metavar="N",
        help="requests waiting for a decode worker with room; more get 429 with Retry-After "
        "/ RESOURCE_EXHAUSTED (default: %(default)s)",
    )
    g.add_argument(
        "--queue-timeout-s",
        type=float,
        default=d.queue_timeout_s,
        metavar="S",
        help="the longest such wait, then 429 (default: %(default)s)",
    )
    g.add_argument(
        "--max-migrations",
        type=int,
        default=d.max_migrations,
        metavar="N",
        help="times a request that has streamed tokens is resumed on another decode worker "
        "when its worker dies or hangs; then UNAVAILABLE (default: %(default)s)",
    )
    g.add_argument(
        "--stream-idle-timeout-s",
        type=float,
        default=d.stream_idle_timeout_s,
        metavar="S",
        help="a decode stream that sends nothing this long counts as a hung worker, and the "
        "request moves elsewhere (default: %(default)s)",
    )


def reliability_config(args: argparse.Namespace) -> dict[str, int | float | None]:
    """RouterConfig fields from `add_reliability_arguments`' flags (ValueError if invalid)."""
    if args.max_migrations < 0 or args.max_queued_requests < 0 or args.worker_waiting_allowance < 0:
        raise ValueError(
            "--max-migrations, --max-queued-requests and --worker-waiting-allowance must be >= 0"
        )
    if not args.stream_idle_timeout_s > 0 or not args.queue_timeout_s >= 0:
        raise ValueError("--stream-idle-timeout-s must be > 0, --queue-timeout-s >= 0")
    for name in ("worker_max_requests", "worker_max_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    return {
        "worker_max_requests": args.worker_max_requests,
        "worker_max_tokens": args.worker_max_tokens,
        "worker_waiting_allowance": args.worker_waiting_allowance,
        "max_queued_requests": args.max_queued_requests,
        "queue_timeout_s": args.queue_timeout_s,
        "max_migrations": args.max_migrations,
        "stream_idle_timeout_s": args.stream_idle_timeout_s,
    }
