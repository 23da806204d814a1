"""From a validated request to a stream of worker tokens: route, prefill, decode.

    async with aclosing(dispatcher.stream(request, slot)) as events:
        async for ev in events:      # WorkerTokens: new token ids, logprobs, finish reason
            ...

Per request the dispatcher picks a decode worker (the policy), then decides Dynamo-style
whether to prefill remotely: only when the prompt's uncached part on that worker is long
(>= `disagg_min_tokens`), a prefill worker is healthy, and the least loaded prefill worker
isn't backed up (outstanding prefill tokens <= `prefill_queue_max_tokens`). The request's
`disaggregate` overrides. A remote prefill that fails UNAVAILABLE is retried on another prefill
worker, and when none is left the decode worker prefills locally. The decode worker's stream
carries every token, prefill's first one included (decode/service.py), so one stream is relayed
whichever path ran; only a first token that ends the request comes from prefill itself.

Load is counted on every path: each worker call holds a `LoadTicket` released in a `finally`,
and closing the stream early (stop string, client gone, abort) cancels the worker's stream,
which makes the worker free the request's KV.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc

from splitserve.engine.hashing import block_hashes
from splitserve.services.tracing import inject_metadata
from splitserve.v1 import pb

from .errors import UnavailableError, UpstreamError, upstream_error
from .policy import Policy, RoutingJob
from .registry import DECODE, PREFILL, LoadTicket, Worker, WorkerRegistry
from .validation import ValidatedRequest

log = logging.getLogger("splitserve.router")

Metadata = Callable[[], tuple[tuple[str, str], ...]]

# Before any token has streamed a decode is safe to start again elsewhere: the worker is gone,
# or its KV pool is full right now (its backpressure).
_DECODE_RETRY_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


@dataclass(frozen=True)
class DispatchConfig:
    kv_namespace: bytes
    block_size: int = 16
    disagg_min_tokens: int = 256
    prefill_queue_max_tokens: int = 8192
    prefill_retries: int = 2  # further prefill workers tried after an UNAVAILABLE
    decode_retries: int = 2  # further decode workers tried before the first token
    prefill_timeout_s: float = 120.0
    request_timeout_s: float = 600.0
    control_timeout_s: float = 5.0  # ReleaseKV and the like


@dataclass
class WorkerTokens:
    """One step of a worker's stream, as the router relays it."""

    token_ids: list[int]
    logprobs: list[pb.TokenLogprob] = field(default_factory=list)
    finish_reason: int = pb.FINISH_REASON_UNSPECIFIED
    num_cached_tokens: int | None = None


@dataclass
class Route:
    decode: Worker
    prefill: Worker | None
    reason: str  # why: requested, no_prefill_workers, short_prompt, prefill_backed_up, ...

    @property
    def mode(self) -> str:
        return "disaggregated" if self.prefill is not None else "local"


class CallSlot:
    """The worker call a request is waiting on, so that Abort can cancel it from outside."""

    def __init__(self) -> None:
        self.aborted = False
        self.call: grpc.aio.Call | None = None

    def abort(self) -> None:
        self.aborted = True
        if self.call is not None:
            self.call.cancel()

    def was_aborted(self) -> bool:
        """A CancelledError came from Abort, not from our own task being cancelled."""
        task = asyncio.current_task()
        return self.aborted and (task is None or not task.cancelling())


class Dispatcher:
    def __init__(
        self,
        registry: WorkerRegistry,
        policy: Policy,
        config: DispatchConfig,
        on_route: Callable[[Route], None] = lambda route: None,
    ) -> None:
        self.registry = registry
        self.policy = policy
        self.config = config
        self.on_route = on_route  # metrics hook
        self._background: set[asyncio.Task[None]] = set()

    def job(self, req: ValidatedRequest) -> RoutingJob:
        cfg = self.config
        hashes = block_hashes(
            req.prompt_token_ids, cfg.block_size, cfg.kv_namespace, req.cache_salt
        )
        return RoutingJob(hashes, len(req.prompt_token_ids), cfg.block_size)

    def plan(self, req: ValidatedRequest, job: RoutingJob) -> Route:
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

    async def stream(
        self, req: ValidatedRequest, slot: CallSlot, metadata: Metadata = inject_metadata
    ) -> AsyncIterator[WorkerTokens]:
        job = self.job(req)
        route = self.plan(req, job)
        self.on_route(route)
        decode_req = _decode_request(req)
        first = None
        if route.prefill is not None:
            # None: every prefill worker failed, and the decode worker prefills locally.
            first = await self._prefill(req, job, route.prefill, slot, metadata)
        if first is not None and (first.finished or slot.aborted):
            self._release_lease(first)  # nothing to decode: the first token ended it
            yield _first_only(first, slot.aborted)
            return
        if first is not None:
            _hand_off(decode_req, first)
        relayed = False
        try:
            async for ev in self._decode(route.decode, job, decode_req, slot, metadata):
                if first is not None:
                    # The prefill worker knows the prompt's real cache hit; to the decode
                    # worker the whole prompt arrived as KV.
                    ev.num_cached_tokens = first.num_cached_tokens
                relayed = True
                yield ev
        finally:
            if first is not None and not relayed:  # the lease may never have been pulled
                self._release_lease(first)

    async def _prefill(
        self,
        req: ValidatedRequest,
        job: RoutingJob,
        worker: Worker,
        slot: CallSlot,
        metadata: Metadata,
    ) -> pb.PrefillResponse | None:
        """Prefill remotely, retrying elsewhere on UNAVAILABLE; None when no worker could."""
        prefill_req = pb.PrefillRequest(
            request_id=req.request_id,
            prompt_token_ids=req.prompt_token_ids,
            sampling=_sampling_options(req),
            cache_salt=req.cache_salt or "",
        )
        tried: list[Worker] = []
        for _ in range(self.config.prefill_retries + 1):
            with self._dispatch(worker, job, job.uncached_tokens(worker)):
                try:
                    slot.call = worker.prefill_stub.Prefill(
                        prefill_req, timeout=self.config.prefill_timeout_s, metadata=metadata()
                    )
                    return await slot.call
                except asyncio.CancelledError:
                    if slot.was_aborted():
                        return pb.PrefillResponse(finished=True)  # nothing to decode
                    raise
                except grpc.aio.AioRpcError as e:
                    if e.code() != grpc.StatusCode.UNAVAILABLE:
                        raise upstream_error(e, worker.address) from e
                    log.warning("prefill on %s unavailable: %s", worker.address, e.details())
                    self.registry.mark_failed(worker)
                finally:
                    slot.call = None
            tried.append(worker)
            others = [w for w in self.registry.healthy(PREFILL) if w not in tried]
            if not others:
                break
            worker = self.policy.select(others, job)
        return None

    async def _decode(
        self,
        worker: Worker,
        job: RoutingJob,
        decode_req: pb.DecodeRequest,
        slot: CallSlot,
        metadata: Metadata,
    ) -> AsyncIterator[WorkerTokens]:
        """Stream from the decode worker; before any token, retry elsewhere if it can't serve.

        Data parallelism: a replica that dies (UNAVAILABLE) or is full (RESOURCE_EXHAUSTED)
        before streaming a token costs the client nothing but time, since another replica
        starts the request afresh. Once a token has been relayed, a retry could only repeat or
        contradict it, so the request fails with the worker's status (UNAVAILABLE for a dead
        one).
        """
        tried: list[Worker] = []
        for attempt in range(self.config.decode_retries + 1):
            started = False
            try:
                async for ev in self._decode_once(worker, job, decode_req, slot, metadata):
                    started = True
                    yield ev
                return
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    self.registry.mark_failed(worker)
                if started:
                    why = e.details() or e.code().name
                    raise UpstreamError(
                        e.code(),
                        f"worker {worker.address} failed mid-stream: {why}; the tokens already "
                        "sent can't be redone elsewhere",
                    ) from e
                tried.append(worker)
                others = [w for w in self.registry.healthy(DECODE) if w not in tried]
                # With KV, a second decode worker pulls the same lease, or recomputes the
                # prompt if the first one had already taken it.
                retry = e.code() in _DECODE_RETRY_CODES and others
                if not retry or attempt == self.config.decode_retries:
                    raise upstream_error(e, worker.address) from e
                log.warning(
                    "decode on %s: %s %s; retrying on another replica",
                    worker.address, e.code().name, e.details(),
                )  # fmt: skip
                worker = self.policy.select(others, job)

    async def _decode_once(
        self,
        worker: Worker,
        job: RoutingJob,
        decode_req: pb.DecodeRequest,
        slot: CallSlot,
        metadata: Metadata,
    ) -> AsyncIterator[WorkerTokens]:
        # Without KV the worker prefills the uncached prompt first, then generates.
        prompt_work = 0 if decode_req.HasField("kv") else job.uncached_tokens(worker)
        work = prompt_work + decode_req.sampling.max_tokens
        with self._dispatch(worker, job, work) as ticket:
            call = worker.decode_stub.Generate(
                decode_req, timeout=self.config.request_timeout_s, metadata=metadata()
            )
            slot.call = call
            try:
                if slot.aborted:
                    call.cancel()
                async for resp in call:
                    ticket.consume(prompt_work + len(resp.token_ids))
                    prompt_work = 0
                    cached = resp.usage.cached_prompt_tokens if resp.HasField("usage") else None
                    yield WorkerTokens(
                        list(resp.token_ids), list(resp.logprobs), resp.finish_reason, cached
                    )
            except asyncio.CancelledError:
                if not slot.was_aborted():
                    raise
                yield WorkerTokens([], finish_reason=pb.FINISH_REASON_ABORT)
            finally:
                # No-op when the stream ended; otherwise the worker sees CANCELLED and frees KV.
                call.cancel()
                slot.call = None

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


def _first_only(first: pb.PrefillResponse, aborted: bool) -> WorkerTokens:
    if aborted:
        return WorkerTokens([], finish_reason=pb.FINISH_REASON_ABORT)
    logprobs = [first.first_logprob] if first.HasField("first_logprob") else []
    return WorkerTokens(
        [first.first_token_id], logprobs, first.finish_reason, first.num_cached_tokens
    )


def _hand_off(decode_req: pb.DecodeRequest, first: pb.PrefillResponse) -> None:
    """The decode worker pulls the KV and streams every token, the first one included."""
    decode_req.kv.CopyFrom(first.kv)
    decode_req.first_token_id = first.first_token_id
    if first.HasField("first_logprob"):
        decode_req.first_logprob.CopyFrom(first.first_logprob)


def _decode_request(req: ValidatedRequest) -> pb.DecodeRequest:
    return pb.DecodeRequest(
        request_id=req.request_id,
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
    return opts
