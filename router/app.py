"""The router's core, shared by the gRPC and HTTP front doors.

    router = Router(RouterConfig(decode=("127.0.0.1:50071",)))
    await router.start()
    with router.admit("grpc"):                    # bounded concurrency; counts the outcome
        request = await router.validate(raw)      # the one validator
        async for delta in router.generate(request):
            ...

The router owns the tokenizer and block hashing only; it never loads weights.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing, contextmanager
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.context import Context

from splitserve.engine.hashing import kv_namespace
from splitserve.engine.loader import Checkpoint, ModelLoadError, open_checkpoint
from splitserve.services.tracing import inject_metadata, tracer

from .dispatch import CallSlot, DispatchConfig, Dispatcher, Metadata
from .errors import OverloadedError, RequestValidationError, RouterError, UnavailableError
from .generation import GenerationDelta, generate
from .metrics import RouterMetrics
from .policy import DEFAULT_ABS_THRESHOLD, DEFAULT_REL_THRESHOLD, make_policy
from .registry import WorkerRegistry
from .validation import GenerateInput, ModelInfo, RequestValidator, ValidatedRequest

log = logging.getLogger("splitserve.router")

MIB = 1024 * 1024


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
    block_size: int = 16  # must match the workers' --block-size
    max_inflight: int = 256
    max_body_bytes: int = MIB
    health_interval_s: float = 2.0
    drop_after_failures: int = 3  # checks failed in a row before a registered worker is dropped
    request_timeout_s: float = 600.0


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
        self.validator = RequestValidator(self.model, self.tokenizer, config.max_body_bytes)
        self.workers = WorkerRegistry(
            config.prefill,
            config.decode,
            config.colocated,
            config.health_interval_s,
            drop_after_failures=config.drop_after_failures,
        )
        policy = make_policy(config.policy, config.balance_abs_tokens, config.balance_rel)
        self.metrics = RouterMetrics(self.workers, policy.name)
        dispatch = DispatchConfig(
            # Exactly the workers' namespace: the model id is the checkpoint's name.
            kv_namespace=kv_namespace(ckpt.config.name, config.kv_dtype, config.block_size),
            block_size=config.block_size,
            disagg_min_tokens=config.disagg_min_tokens,
            prefill_queue_max_tokens=config.prefill_queue_max_tokens,
            prefill_retries=config.prefill_retries,
            decode_retries=config.decode_retries,
            request_timeout_s=config.request_timeout_s,
        )
        self.dispatcher = Dispatcher(self.workers, policy, dispatch, self.metrics.observe_route)
        self.active: dict[str, CallSlot] = {}
        self.draining = False
        self.num_inflight = 0

    # ---- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        """Check every worker once, so the first request already sees the healthy ones."""
        await self.workers.check_all()
        self.workers.start()

    async def drain(self, timeout_s: float) -> None:
        """Refuse new requests, then wait (bounded) for the admitted ones to finish."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self.num_inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

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
    ) -> AsyncIterator[GenerationDelta]:
        """Deltas of one request; closing the iterator early cancels the worker's stream.

        `arrival` (time.monotonic()) is when the front door got the request: TTFT counts
        from there, validation and tokenization included.
        """
        rid = request.request_id
        if rid in self.active:
            raise RequestValidationError(
                "duplicate_request_id", f"request {rid!r} is already running", "request_id"
            )
        slot = self.active[rid] = CallSlot()
        span = tracer().start_span("router.generate", context=parent)
        span.set_attribute("splitserve.request_id", rid)
        span.set_attribute("splitserve.prompt_tokens", len(request.prompt_token_ids))
        self.metrics.prompt_tokens.inc(len(request.prompt_token_ids))
        start = last = arrival if arrival is not None else time.monotonic()
        first = True
        try:
            deltas = generate(self.dispatcher, self.tokenizer, request, slot, _metadata(span))
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
            del self.active[rid]
            span.end()

    def _observe_tokens(self, num_tokens: int, gap_s: float, first: bool) -> None:
        self.metrics.generation_tokens.inc(num_tokens)
        if first:
            self.metrics.ttft.observe(gap_s)
        else:
            self.metrics.itl.observe(gap_s / num_tokens)

    def abort(self, request_id: str) -> bool:
        slot = self.active.get(request_id)
        if slot is None:
            return False
        slot.abort()
        return True


def _metadata(span: trace.Span) -> Metadata:
    """Outgoing-call metadata carrying this request's span (its context, not the caller's)."""

    def metadata() -> tuple[tuple[str, str], ...]:
        with trace.use_span(span, end_on_exit=False):
            return inject_metadata()

    return metadata
