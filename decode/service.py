"""The Decode servicer (also the colocated worker): stream a request's tokens.

    Generate(req with kv)     reserve the prompt's blocks (waiting up to --kv-reserve-wait-s
                              for running requests to free enough) -> PullKV from the prefill
                              worker under a deadline -> validate the header against this cache
                              before allocating -> adopt -> stream. Neither a pool that stays
                              full nor a failed transfer fails the request: the remote KV is
                              let go and the prompt is prefilled here instead, queued by the
                              engine like any other.
    Generate(req without kv)  prefill here (the router's short-prompt path; a colocated worker
                              always takes it), with the kvstore's prefix blocks when configured.
    Generate(req + resume)    a request the router migrated off a failed worker: the output the
                              client already has is checked (ids, count < max_tokens, context),
                              prefilled here with the prompt, counted as output, and only new
                              tokens are streamed.
    Abort                     by request id; the stream ends with FINISH_REASON_ABORT.

The stream carries every output token, the prefill worker's first token included, so the
router relays one stream whichever path ran. A cancelled RPC aborts the request; every ending
returns its blocks. So does the RPC's deadline: gRPC cancels the call when it passes, and the
calls made for it (PullKV, the kvstore lookups) are bounded by the time it has left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from dataclasses import replace
from typing import Any

import grpc

from splitserve.engine.engine import CapacityError, RequestError
from splitserve.engine.outputs import KVExport, RequestOutput
from splitserve.engine.sampling_params import SamplingParams
from splitserve.services.security import TLSConfig, open_channel
from splitserve.services.server import CHANNEL_OPTIONS
from splitserve.services.tracing import inject_metadata, stream_span
from splitserve.v1 import pb, rpc
from splitserve.wire import kv_shm
from splitserve.wire.kv_chunks import ChunkView, off_loop, parse_chunk
from splitserve.wire.kv_codec import (
    KVAssembler,
    KVCodecError,
    ReceiveBuffers,
    TransferHeader,
    format_mismatch,
    format_name,
)
from splitserve.workers.engine_loop import RequestStream
from splitserve.workers.kv_prefix import PrefixPlan
from splitserve.workers.worker import (
    FINISH_REASONS,
    Worker,
    abort_with,
    prompt_logprobs,
    token_logprobs,
    usage,
    worker_load,
)
from splitserve.workers.worker import (
    sampling_params as to_params,
)

log = logging.getLogger("splitserve")
Ctx = grpc.aio.ServicerContext

MIN_PULL_BYTES_PER_S = 64 * 1024 * 1024  # the pull deadline grows with the KV's size
MAX_CHANNELS = 64
PULL_KV_METHOD = f"/{pb.DESCRIPTOR.services_by_name['Prefill'].full_name}/PullKV"
RESERVE_POLL_S = 0.05  # how often a prompt waiting for blocks tries again, at most


class TransferError(Exception):
    """The KV could not be pulled or doesn't fit: recompute instead."""


class _Request:
    """One Generate call's state: the stream, and what the first response must carry."""

    def __init__(self, stream: RequestStream, params: SamplingParams) -> None:
        self.stream = stream
        self.params = params
        self.plan: PrefixPlan | None = None  # set when prefilled here with a kvstore
        self.adopted = False  # the prompt KV came from a prefill worker
        self.first_logprob: pb.TokenLogprob | None = None  # the prefill worker's, if sent
        # The router streamed the prefill worker's token already (first_token_sent): the first
        # response says it was left out, and an adopted stream's copy of it is dropped.
        self.first_token_sent = False


class DecodeServicer(rpc.DecodeServicer):
    def __init__(
        self,
        worker: Worker,
        pull_timeout_s: float = 10.0,
        reserve_wait_s: float = 10.0,
        shm_dir: str = "",
    ) -> None:
        """`shm_dir`: where to make the files a prefill worker on this host writes KV into
        (wire/kv_shm.py); "" pulls every byte over gRPC."""
        self.w = worker
        self.pull_timeout_s = pull_timeout_s
        self.reserve_wait_s = reserve_wait_s
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Receive buffers (streamed pulls) and files (same-host pulls) outlive a pull, up to a
        # quarter of the pool's bytes each: a prompt of up to a quarter of the pool lands in
        # memory that was already faulted in.
        keep = worker.engine.engine.runner.kv_cache_bytes // 4
        self._buffers = ReceiveBuffers(keep)
        self._segments: kv_shm.Segments | None = None
        if shm_dir:
            if n := kv_shm.remove_stale(shm_dir):
                log.info("removed %d KV segments left in %s by killed workers", n, shm_dir)
            self._segments = kv_shm.Segments(shm_dir, keep)

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        pass

    async def drain(self, timeout: float) -> None:
        await self.w.engine.drain(timeout)

    async def close(self) -> None:
        if self._segments is not None:
            self._segments.close()
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        await self.w.prefix.close()

    # ---- RPCs ------------------------------------------------------------------------------
    async def Generate(
        self, request: pb.DecodeRequest, context: Ctx
    ) -> AsyncIterator[pb.DecodeResponse]:
        with stream_span("decode.Generate", context):
            error: BaseException | None = None
            try:
                req = await self._open(request, context)
            except Exception as exc:
                error = exc
            if isinstance(error, TimeoutError):  # the deadline passed while it was opening
                self.w.metrics.request_done("rejected")
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed")
            if error is not None:
                self.w.metrics.request_done("rejected")
                await abort_with(context, error)
            with req.stream:
                try:
                    async for response in self._responses(req):
                        yield response
                except asyncio.CancelledError:
                    self.w.metrics.request_done("cancelled")
                    raise
                except Exception as exc:
                    error = exc
            if error is not None:
                self.w.metrics.request_done("error")
                await abort_with(context, error)

    async def Abort(self, request: pb.AbortRequest, context: Ctx) -> pb.AbortResponse:
        return pb.AbortResponse(found=await self.w.engine.abort(request.request_id))

    async def GetLoad(self, request: pb.LoadRequest, context: Ctx) -> pb.WorkerLoad:
        return worker_load(self.w.engine, self.w.worker_id, self.w.role)

    # ---- opening a request -----------------------------------------------------------------
    async def _open(self, request: pb.DecodeRequest, context: Ctx) -> _Request:
        req = await self._open_stream(request, context)
        req.first_token_sent = request.first_token_sent
        return req

    async def _open_stream(self, request: pb.DecodeRequest, context: Ctx) -> _Request:
        prompt = list(request.prompt_token_ids)
        params = to_params(request.sampling)
        self.w.engine.engine.check_request(prompt, params)
        request_id = request.request_id or uuid.uuid4().hex
        salt = request.cache_salt or None
        resume = list(request.resume_token_ids)
        if resume:
            if request.HasField("kv"):
                raise RequestError("a resumed request is prefilled here; it can't come with kv")
            self.w.engine.engine.check_resume(prompt, params, resume)
        if request.first_token_sent and not request.HasField("kv"):
            raise RequestError("first_token_sent needs kv and first_token_id")
        if not request.HasField("kv"):
            return await self._prefill_here(request_id, prompt, params, salt, context, resume)
        if not request.HasField("first_token_id"):
            raise RequestError("a request with kv needs first_token_id")
        if request.first_token_sent:
            # Should the KV not be adopted, the prompt is prefilled here followed by the token
            # the client already has, and the stream goes on after it; its prompt logprobs went
            # out with that token.
            resume = [request.first_token_id]
            self.w.engine.engine.check_resume(prompt, params, resume)
            params = replace(params, prompt_logprobs=None)
        if request.kv.num_tokens != len(prompt):
            raise RequestError(
                f"kv covers {request.kv.num_tokens} tokens, the prompt has {len(prompt)}"
            )
        stream = await self._reserve(request_id, prompt, params, salt, _time_left(context))
        if stream is None:  # the pool stayed full: compute the prompt here, in the engine's queue
            self._release_remote(request.kv)
            self.w.metrics.transfer_fallback()
            return await self._prefill_here(request_id, prompt, params, salt, context, resume)
        try:
            adopted = await self._adopt(stream, request, _time_left(context))
        except BaseException:
            stream.close()
            raise
        if adopted or stream.finished:  # finished: aborted while the KV was in flight
            req = _Request(stream, params)
            req.adopted = True
            if request.HasField("first_logprob"):
                req.first_logprob = request.first_logprob
            return req
        stream.close()
        self._release_remote(request.kv)
        self.w.metrics.transfer_fallback()
        return await self._prefill_here(request_id, prompt, params, salt, context, resume)

    async def _reserve(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        salt: str | None,
        time_left: float | None,
    ) -> RequestStream | None:
        """The blocks for a prompt whose KV waits on a prefill worker: at once if the pool has
        room, else as soon as running requests free enough, within `reserve_wait_s` (and the
        time the request has left). None if the pool stayed full that long.

        Refusing at once (RESOURCE_EXHAUSTED) made a burst of long prompts fail with 429 while
        the mesh was only busy: 32 concurrent 1,100-token prompts on one decode worker lost 22
        of them, though each would have had room a few steps later."""
        wait = self.reserve_wait_s if time_left is None else min(self.reserve_wait_s, time_left)
        deadline = time.monotonic() + wait
        delay = 0.005
        while True:
            try:
                return await self.w.engine.reserve_prefilled(request_id, prompt, params, salt)
            except CapacityError:
                if time.monotonic() + delay > deadline:
                    return None
            await asyncio.sleep(delay)
            delay = min(2 * delay, RESERVE_POLL_S)

    async def _adopt(
        self, stream: RequestStream, request: pb.DecodeRequest, time_left: float | None
    ) -> bool:
        """Pull the KV into the reservation. False if that failed: the caller recomputes."""
        num_tokens = stream.num_prompt_tokens
        # A same-host pull's file: it lives until the engine has copied the KV out of it.
        segment, clean = self._segment(num_tokens), False
        try:
            kv, buffer = await self._pull(request.kv, num_tokens, segment, time_left)
            adopted = await self.w.engine.complete_prefilled(stream, kv, request.first_token_id)
            # Done with: the pool holds a copy. Only here: a call cancelled while it waited may
            # still run on the engine thread, reading the buffer (or the file).
            del kv
            if buffer is not None:
                self._buffers.give(buffer)
            clean = True
            return adopted
        except (TransferError, KVCodecError, RequestError, ValueError) as exc:
            log.warning(
                "request %s: KV from %s unusable, prefilling here: %s",
                stream.request_id,
                request.kv.prefill_address,
                exc,
            )
            return False
        finally:
            if segment is not None:  # kept for the next pull only after a clean one
                if clean and self._segments is not None:
                    self._segments.give(segment)
                else:
                    segment.close()

    async def _prefill_here(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        salt: str | None,
        context: Ctx,
        resume: list[int] | None = None,
    ) -> _Request:
        prefix = self.w.prefix
        plan = None
        if prefix.store is not None:
            # The prompt's blocks only: the store holds prompts, not a resumed request's output.
            # The lookup is an optimisation, so the RPC's deadline bounds it (gRPC cancels the
            # call itself when the deadline passes; this is only the earlier, cleaner exit).
            plan = await asyncio.wait_for(prefix.prepare(prompt, salt), _time_left(context))
        stream = await self.w.engine.add_request(
            request_id,
            prompt,
            params,
            salt,
            export_kv=plan is not None,
            resume_token_ids=resume or (),
        )
        req = _Request(stream, params)
        req.plan = plan
        return req

    # ---- the KV transfer -------------------------------------------------------------------
    def _expected_shape(self, num_tokens: int) -> tuple[int, ...]:
        llm = self.w.engine.engine
        pool = llm.runner.kv_layout
        return (*pool[:2], -(-num_tokens // llm.block_size), *pool[3:])

    async def _pull(
        self,
        handle: pb.KVHandle,
        num_tokens: int,
        segment: kv_shm.Segment | None = None,
        time_left: float | None = None,
    ) -> tuple[KVExport, bytearray | None]:
        """The KV, and the receive buffer it lies in (for `ReceiveBuffers.give` once the KV
        is in the pool; None: it lies in `segment`)."""
        expected_shape = self._expected_shape(num_tokens)
        # num_bytes is the sender's word: it stretches the deadline only up to a point; the
        # request's own deadline caps it.
        timeout = self.pull_timeout_s + min(handle.num_bytes / MIN_PULL_BYTES_PER_S, 120.0)
        if time_left is not None:
            timeout = max(0.001, min(timeout, time_left))
        start = time.perf_counter()
        assembler = await self._receive(handle, num_tokens, expected_shape, segment, timeout)
        data = assembler.finish()  # checked as it came: what is left is the last rows
        self.w.metrics.kv_transfer_seconds.observe(time.perf_counter() - start)
        return KVExport(data, num_tokens), assembler.buffer

    async def _receive(
        self,
        handle: pb.KVHandle,
        num_tokens: int,
        expected_shape: tuple[int, ...],
        segment: kv_shm.Segment | None,
        timeout: float,
    ) -> KVAssembler:
        # PullKV with kv_chunks' parser: each chunk's data stays a view of what gRPC received
        pull = self._channel(handle.prefill_address).unary_stream(
            PULL_KV_METHOD,
            request_serializer=pb.PullKVRequest.SerializeToString,
            response_deserializer=parse_chunk,
        )
        request = pb.PullKVRequest(lease_id=handle.lease_id)
        if segment is not None:
            request.shm_name = segment.name
        call = pull(request, timeout=timeout, metadata=inject_metadata())
        llm = self.w.engine.engine
        assembler: KVAssembler | None = None
        try:
            async for chunk in call:
                if assembler is None:
                    assembler = _assembler(
                        chunk,
                        llm.runner.kv_format,
                        expected_shape,
                        num_tokens,
                        self._buffers,
                        # the file, if the sender could write into it (it starts there or not
                        # at all); else the bytes go to a receive buffer, not into our tmpfs
                        segment if chunk.shm_length else None,
                    )
                # copy, checksum and finite-check (off the loop if large) while the next arrives
                if chunk.shm_length:
                    n = chunk.shm_length
                    await off_loop(n, assembler.add_written, chunk.offset, n)
                    self.w.metrics.transfer_bytes("received", n, shm=True)
                else:
                    await off_loop(len(chunk.data), assembler.add, chunk.offset, chunk.data)
                    self.w.metrics.transfer_bytes("received", len(chunk.data))
                if assembler.complete:
                    # every byte is here and checked: the sender's end of stream tells nothing
                    # more, and it was seen to arrive up to 3 ms after the last chunk
                    break
        except grpc.RpcError as exc:
            raise TransferError(f"PullKV failed: {_describe(exc)}") from None
        except kv_shm.SegmentError as exc:
            raise TransferError(f"KV segment: {exc}") from None
        finally:
            call.cancel()  # a rejected header stops the sender too
        if assembler is None:
            raise TransferError("PullKV sent no chunks")
        return assembler

    def _segment(self, num_tokens: int) -> kv_shm.Segment | None:
        """A file for a prefill worker on this host to write the KV into (wire/kv_shm.py), or
        None: off, or the directory won't take one (the bytes are streamed)."""
        if self._segments is None:
            return None
        nbytes = math.prod(self._expected_shape(num_tokens))
        try:
            return self._segments.take(nbytes * self.w.engine.engine.runner.kv_dtype.itemsize)
        except kv_shm.SegmentError as exc:
            log.warning("KV segments off until restart: %s", exc)
            self._segments = None
            return None

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            if len(self._channels) >= MAX_CHANNELS:  # drop the oldest peer
                old = self._channels.pop(next(iter(self._channels)))
                self._background(old.close(grace=5.0))
            channel = open_channel(address, TLSConfig.from_env(), CHANNEL_OPTIONS)
            self._channels[address] = channel
        return channel

    def _release_remote(self, handle: pb.KVHandle) -> None:
        """Best effort: free the prefill worker's lease now instead of at its expiry."""

        async def release() -> None:
            with contextlib.suppress(grpc.RpcError):
                stub = rpc.PrefillStub(self._channel(handle.prefill_address))
                await stub.ReleaseKV(
                    pb.ReleaseKVRequest(lease_id=handle.lease_id),
                    timeout=2.0,
                    metadata=inject_metadata(),
                )

        self._background(release())

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    # ---- streaming -------------------------------------------------------------------------
    async def _responses(self, req: _Request) -> AsyncIterator[pb.DecodeResponse]:
        first = True
        async for out in req.stream:
            response = self._response(out, req.params)
            if first and req.first_token_sent:
                response.first_token_withheld = True
                if req.adopted and response.token_ids:  # adopting emits the first token
                    del response.token_ids[0]
                    del response.logprobs[:1]
            elif first and req.first_logprob is not None and response.logprobs:
                response.logprobs[0].CopyFrom(req.first_logprob)
            first = False
            yield response
            if out.finished:
                self._finished(req, out)
                return

    def _response(self, out: RequestOutput, params: SamplingParams) -> pb.DecodeResponse:
        response = pb.DecodeResponse(token_ids=out.new_token_ids)
        response.prompt_logprobs.extend(prompt_logprobs(out))
        if params.logprobs is not None:
            response.logprobs.extend(token_logprobs(out))
        if out.finished:
            response.finish_reason = FINISH_REASONS[out.finish_reason or "abort"]
            if isinstance(out.stop_reason, int):
                response.stop_token_id = out.stop_reason
            response.usage.CopyFrom(usage(out))
        return response

    def _finished(self, req: _Request, out: RequestOutput) -> None:
        m = self.w.metrics
        m.request_done(out.finish_reason or "abort")
        if not req.adopted:  # the prefill worker counts the prompts it computed
            cached = out.num_cached_tokens
            m.prompt_tokens(out.num_prompt_tokens - cached, cached)
        if req.plan is not None and out.kv is not None:
            self.w.prefix.write_back(req.plan, out.kv)


def _assembler(
    chunk: ChunkView,
    dtype: object,
    expected_shape: tuple[int, ...],
    num_tokens: int,
    buffers: ReceiveBuffers | None = None,
    segment: kv_shm.Segment | None = None,
) -> KVAssembler:
    """Check the header against exactly what the reservation can take, before allocating."""
    if chunk.header is None:
        raise TransferError("the first KV chunk has no header")
    h = chunk.header
    header = TransferHeader(h.dtype, tuple(h.shape), h.num_tokens, h.total_bytes, h.crc32)
    mine = format_name(dtype)  # type: ignore[arg-type]
    if h.dtype != mine:  # before the shape: a packed row is wider, and the dtype says why
        raise KVCodecError(format_mismatch(h.dtype, mine), "dtype")
    if header.num_tokens != num_tokens or header.shape != expected_shape:
        raise TransferError(
            f"KV header says {header.num_tokens} tokens {header.shape}; "
            f"this request needs {num_tokens} tokens {expected_shape}"
        )
    return KVAssembler(
        header,
        dtype,  # type: ignore[arg-type]
        expected_shape,
        buffers=buffers,
        segment=segment,
    )


def _time_left(context: Ctx) -> float | None:
    """Seconds until the RPC's deadline; None when the caller set none."""
    left = context.time_remaining()
    return None if left is None else max(0.0, left)


def _describe(exc: grpc.RpcError) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc)
