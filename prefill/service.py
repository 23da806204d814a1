"""The Prefill servicer: compute a prompt's KV and first token, lease the KV to a decode worker.

    Prefill(req)  validate -> reserve lease bytes -> local + kvstore prefix -> run the prompt
                  (max_tokens=1, export_kv) -> lease the KV -> write new blocks to the kvstore
                  in the background -> first token + KVHandle
    PullKV(lease) header on the first chunk, <= 4 MiB of raw bytes per chunk; the lease ends
                  with the stream, however the stream ends
    ReleaseKV     the router gives a lease up (its decode failed or went elsewhere)
    GetLoad       the engine loop's last snapshot

A request whose first token already ends it gets no lease (there is nothing to decode).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc

from splitserve.engine.outputs import KVExport, RequestOutput
from splitserve.engine.sampling_params import SamplingParams
from splitserve.executors.runner import kv_block_bytes
from splitserve.prefill.leases import Lease, LeaseCapacityError, LeaseTable, Reservation
from splitserve.services.tracing import extract_context, stream_span, tracer
from splitserve.v1 import pb, rpc
from splitserve.wire import kv_shm
from splitserve.wire.kv_chunks import as_wire, encode_chunk, off_loop
from splitserve.wire.kv_codec import CHUNK_BYTES, export_transfer
from splitserve.workers.kv_prefix import PrefixPlan
from splitserve.workers.worker import (
    OverloadedError,
    Worker,
    abort_with,
    prompt_logprobs,
    token_logprob,
    worker_load,
)
from splitserve.workers.worker import (
    sampling_params as to_params,
)

log = logging.getLogger("splitserve")
Ctx = grpc.aio.ServicerContext


def prefill_params(params: SamplingParams) -> SamplingParams:
    """Sample only the first token, exactly as the whole request would.

    min_tokens stays at most 1, so EOS and stop ids are masked for the first token iff the
    request masks them; max_tokens=1 ends the run after it.
    """
    return dataclasses.replace(params, max_tokens=1, min_tokens=min(params.min_tokens, 1))


class PrefillServicer(rpc.PrefillServicer):
    def __init__(
        self,
        worker: Worker,
        leases: LeaseTable,
        chunk_bytes: int = CHUNK_BYTES,
        expire_interval_s: float = 1.0,
        shm_dir: str = "",
    ) -> None:
        """`shm_dir`: where a decode worker on this host makes the files it names in PullKV
        (wire/kv_shm.py); "" streams every byte."""
        self.w = worker
        self.shm_dir = shm_dir
        self.leases = leases
        self.chunk_bytes = chunk_bytes
        self.expire_interval_s = expire_interval_s
        llm = worker.engine.engine
        self.block_size = llm.block_size
        self.block_bytes = kv_block_bytes(
            llm.model_config, llm.block_size, llm.runner.dtype, llm.config.kv_cache_dtype
        )
        self.kv_format = llm.runner.kv_format  # KV goes out as the pool holds it
        self._expirer: asyncio.Task[None] | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self._expirer = asyncio.create_task(self._expire_loop())

    async def drain(self, timeout: float) -> None:
        """Finish in-flight prefills, then give decode workers time to pull their leases."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await self.w.engine.drain(timeout)
        while len(self.leases) and loop.time() < deadline:
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        if self._expirer is not None:
            self._expirer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expirer
        await self.w.prefix.close()

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(self.expire_interval_s)
            n = self.leases.expire()
            if n:
                log.info("dropped %d KV leases that were never pulled", n)
                self.w.metrics.leases_expired(n)

    # ---- RPCs ------------------------------------------------------------------------------
    async def Prefill(self, request: pb.PrefillRequest, context: Ctx) -> pb.PrefillResponse:
        with tracer().start_as_current_span("prefill.Prefill", context=extract_context(context)):
            try:
                return await self._prefill(request, context.time_remaining())
            except Exception as exc:
                error = exc
        self.w.metrics.request_done("rejected")
        if isinstance(error, TimeoutError):  # the deadline passed during the kvstore lookup
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed")
        await abort_with(context, error)

    async def PullKV(self, request: pb.PullKVRequest, context: Ctx) -> AsyncIterator[bytes]:
        lease = self.leases.begin_pull(request.lease_id)
        if lease is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                "no such KV lease: expired, released, already pulled, or never issued",
            )
        with stream_span("prefill.PullKV", context):
            segment = self._segment(request.shm_name, lease.num_bytes)
            try:
                piece = self.chunk_bytes if segment is None else kv_shm.PIECE_BYTES
                for i, (offset, data) in enumerate(lease.chunks(piece)):
                    header = self._header(lease) if i == 0 else None
                    if segment is not None:
                        try:  # off the loop: pwrite releases the GIL while it copies
                            await off_loop(len(data), segment.write, offset, data)
                        except OSError as exc:  # ENOSPC: a full tmpfs; the rest goes inline
                            log.warning("KV segment write failed, streaming the rest: %s", exc)
                            segment.close()
                            segment = None
                        else:
                            yield encode_chunk(offset, b"", header, shm_length=len(data))
                            self.w.metrics.transfer_bytes("sent", len(data), shm=True)
                            continue
                    # the message's wire bytes, built from a view of the lease in one copy;
                    # registered with kv_chunks.as_wire, which sends them as they are
                    yield encode_chunk(offset, data, header)
                    self.w.metrics.transfer_bytes("sent", len(data))
            finally:
                if segment is not None:
                    segment.close()
                self.leases.release(lease.lease_id)  # pulled, or the puller went away

    def _segment(self, name: str, nbytes: int) -> kv_shm.SegmentWriter | None:
        """The puller's shared-memory file, when it named one that is here (same host)."""
        if not name or not self.shm_dir:
            return None
        try:
            return kv_shm.open_for_writing(self.shm_dir, name, nbytes)
        except kv_shm.SegmentError as exc:  # another host, or not what was promised: stream
            log.debug("KV segment not used: %s", exc)
            return None

    async def ReleaseKV(self, request: pb.ReleaseKVRequest, context: Ctx) -> pb.ReleaseKVResponse:
        return pb.ReleaseKVResponse(released=self.leases.release(request.lease_id))

    async def GetLoad(self, request: pb.LoadRequest, context: Ctx) -> pb.WorkerLoad:
        return worker_load(self.w.engine, self.w.worker_id, self.w.role)

    # ---- the prefill -----------------------------------------------------------------------
    async def _prefill(
        self, request: pb.PrefillRequest, time_left: float | None = None
    ) -> pb.PrefillResponse:
        """`time_left`: until the RPC's deadline (None: none). gRPC cancels the call when it
        passes, which aborts the engine request and ends the lease reservation; the kvstore
        lookup is bounded by it too, so a slow store can't outlast the request."""
        prompt = list(request.prompt_token_ids)
        params = to_params(request.sampling)
        llm = self.w.engine.engine
        llm.check_request(prompt, params)
        salt = request.cache_salt or None
        request_id = request.request_id or uuid.uuid4().hex
        try:
            reservation = self.leases.reserve(self._kv_bytes(len(prompt)))
        except LeaseCapacityError as exc:
            raise OverloadedError(str(exc)) from None
        with reservation:
            lookup = self.w.prefix.prepare(prompt, salt)
            plan = await asyncio.wait_for(lookup, None if time_left is None else max(0, time_left))
            out = await self._run(request_id, prompt, params, salt)
            assert out.kv is not None  # export_kv=True always attaches it
            finish = self._finish_reason(out, params, len(prompt))
            lease = None if finish else await self._lease(reservation, out.kv)
        self.w.prefix.write_back(plan, out.kv, after=None if lease is None else _ended(lease))
        self._count(out)
        return self._response(request_id, out, params, finish, lease, plan)

    async def _run(
        self, request_id: str, prompt: list[int], params: SamplingParams, salt: str | None
    ) -> RequestOutput:
        stream = await self.w.engine.add_request(
            request_id, prompt, prefill_params(params), salt, export_kv=True
        )
        result = RequestOutput.empty(request_id)
        with stream:
            async for out in stream:
                result.merge(out)
        return result

    def _finish_reason(
        self, out: RequestOutput, params: SamplingParams, num_prompt: int
    ) -> pb.FinishReason.ValueType:
        """Whether the first token ends the whole request (not just this max_tokens=1 run)."""
        if out.finish_reason == "stop":
            return pb.FINISH_REASON_STOP
        if params.max_tokens <= 1 or num_prompt + 1 >= self.w.engine.engine.max_model_len:
            return pb.FINISH_REASON_LENGTH
        return pb.FINISH_REASON_UNSPECIFIED

    async def _lease(self, reservation: Reservation, kv: KVExport) -> Lease:
        # Checksumming tens of MB would stall every other RPC on the loop. The lease holds a
        # view of the exported tensor (read_kv's own copy), not another copy of it.
        header, data = await asyncio.to_thread(
            export_transfer, kv.data, kv.num_tokens, self.kv_format
        )
        return reservation.commit(header, data)

    def _response(
        self,
        request_id: str,
        out: RequestOutput,
        params: SamplingParams,
        finish: pb.FinishReason.ValueType,
        lease: Lease | None,
        plan: PrefixPlan,
    ) -> pb.PrefillResponse:
        response = pb.PrefillResponse(
            request_id=request_id,
            first_token_id=out.new_token_ids[0],
            num_cached_tokens=out.num_cached_tokens,
            num_fetched_tokens=min(
                plan.num_fetched_blocks * self.block_size, out.num_cached_tokens
            ),
            finished=finish != pb.FINISH_REASON_UNSPECIFIED,
            finish_reason=finish,
        )
        response.prompt_logprobs.extend(prompt_logprobs(out))
        if params.logprobs is not None:
            response.first_logprob.CopyFrom(
                token_logprob(out.new_logprobs[0], out.new_top_logprobs[0])
            )
        if lease is not None:
            response.kv.CopyFrom(
                pb.KVHandle(
                    prefill_address=self.w.address,
                    lease_id=lease.lease_id,
                    num_tokens=lease.header.num_tokens,
                    num_bytes=lease.num_bytes,
                    lease_ms=int(self.leases.ttl_s * 1000),
                )
            )
        return response

    # ---- helpers ---------------------------------------------------------------------------
    def _kv_bytes(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size) * self.block_bytes

    def _header(self, lease: Lease) -> pb.KVHeader:
        h = lease.header
        return pb.KVHeader(
            dtype=h.dtype,
            shape=h.shape,
            layer_start=0,
            layer_end=h.shape[0],
            num_tokens=h.num_tokens,
            total_bytes=h.total_bytes,
            crc32=h.crc32,
            tp_rank=0,
            tp_size=1,
        )

    def _count(self, out: RequestOutput) -> None:
        m = self.w.metrics
        m.prompt_tokens(out.num_prompt_tokens - out.num_cached_tokens, out.num_cached_tokens)
        m.request_done("prefilled")


def add_prefill_service(servicer: PrefillServicer, server: Any) -> None:
    """The generated registration, except that PullKV's responses go out through
    `kv_chunks.as_wire`: the chunks are already wire bytes (one copy of the KV, not four)."""

    class Capture:
        def add_generic_rpc_handlers(self, handlers: Any) -> None:
            pass

        def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
            self.service, self.handlers = service, dict(handlers)

    capture = Capture()
    rpc.add_PrefillServicer_to_server(servicer, capture)
    pull = capture.handlers["PullKV"]
    capture.handlers["PullKV"] = grpc.unary_stream_rpc_method_handler(
        servicer.PullKV,
        request_deserializer=pull.request_deserializer,
        response_serializer=as_wire,
    )
    generic = grpc.method_handlers_generic_handler(capture.service, capture.handlers)
    server.add_generic_rpc_handlers((generic,))
    server.add_registered_method_handlers(capture.service, capture.handlers)


def _ended(lease: Lease) -> asyncio.Future[None]:
    """Done when the lease ends: the kvstore write-back waits for it (up to a bound), so that
    signing and sending the same tens of MB doesn't share the CPU with the hand-off that the
    request's first token waits on."""
    ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    lease.on_end.append(lambda: ended.done() or ended.set_result(None))
    return ended
