"""A pipeline stage after the first: `python -m splitserve.executors.pipeline.stage`.

Holds layers [a, b) of the model and their KV pool, and serves `splitserve.v1.Stage`:

- `Forward`, a bidirectional stream of micro-batches (step wire + hidden states). Each is run
  on one compute thread, in arrival order, while the event loop keeps reading the next ones
  (at most `--max-in-flight` at a time; past that it stops reading and gRPC's flow control
  holds the sender back). The last stage answers with logits; any other stage forwards its
  hidden states to the next stage over a Forward stream of its own and relays what comes back.
- `ReadKV` / `WriteKV` for its layers, `Stats` (busy time, micro-batches) and `Handshake`
  (the first stage checks that model, layers and pool match, and says where the next stage is).
- `grpc.health.v1` like every other service; SIGTERM drains.

Usually the first stage's worker starts it (`--spec-json`, `--parent-pid`: it exits when that
worker is gone). To run one yourself (compose), give it the worker's engine flags and its index:

    python -m splitserve.executors.pipeline.stage --stage-index 1 --pipeline-stages 2 \\
        --port 50070 ...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import torch

from splitserve.engine.config import EngineConfig, ModelConfig, kv_cache_key, parse_dtype
from splitserve.executors.build import resolve_quantization
from splitserve.executors.flags import add_engine_args, engine_config
from splitserve.executors.pipeline.executor import build_stage_shard
from splitserve.executors.pipeline.processes import StageSpec
from splitserve.executors.runner import plan_num_blocks
from splitserve.executors.shard import max_positions
from splitserve.executors.tensor_parallel import ShardGroupError
from splitserve.model.kv_quant import kv_format_name, kv_row
from splitserve.model.loader import ModelLoadError, open_checkpoint
from splitserve.model.parallel import ParallelConfigError, stage_layer_ranges
from splitserve.services import heap
from splitserve.services.parent import follow_launcher
from splitserve.services.security import TLSConfig, add_tls_arguments, open_channel
from splitserve.services.server import (
    ServiceServer,
    configure_logging,
    fast_gil_handoff,
    full_service_name,
    install_uvloop,
)
from splitserve.v1 import pb, rpc
from splitserve.wire.kv_codec import KVCodecError, dtype_name
from splitserve.wire.pipeline_codec import (
    STAGE_CHANNEL_OPTIONS,
    bytes_wire,
    kv_assembler,
    kv_chunks,
    layout_differences,
    layout_message,
    message_tensor,
    tensor_message,
)

log = logging.getLogger("splitserve")

DEFAULT_PORT = 50070
PARENT_POLL_S = 0.5
EXIT_AFTER_PARENT_S = 15.0  # hard exit if an orderly stop takes longer once the parent is gone
_GONE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# Results streams open at once on a last stage: a worker holds one (a new one after a failure,
# once the old one is cancelled), so this only stops a misbehaving client.
MAX_RESULTS_STREAMS = 16


@dataclass
class StageCounters:
    busy_s: float = 0.0
    cpu_s: float = 0.0
    micro_batches: int = 0
    tokens: int = 0


class StageRuntime:
    """The shard and its counters. Every method that touches tensors runs on the one compute
    thread, so micro-batches and KV moves never overlap."""

    def __init__(self, spec: StageSpec, cfg: ModelConfig, shard) -> None:
        self.spec = spec
        self.cfg = cfg
        self.shard = shard
        self.engine: EngineConfig = spec.engine
        self.layers = (spec.first_layer, spec.last_layer)
        self.is_last = spec.last_layer == cfg.num_layers
        self.dtype = parse_dtype(self.engine.dtype)
        self.kv_format = kv_format_name(self.dtype, self.engine.kv_cache_dtype)
        self.device = torch.device(self.engine.device)
        dtype = kv_cache_key(dtype_name(self.dtype), self.engine.kv_cache_dtype)
        self.layout = layout_message(
            cfg, self.layers, spec.num_blocks, self.engine.block_size, dtype,
            self.engine.tensor_parallel_size,
        )  # fmt: skip
        self.counters = StageCounters()
        self.started = time.monotonic()
        self.max_positions = max_positions(cfg, self.engine)  # the rotary table's length

    @property
    def pool(self) -> tuple[int, ...]:
        c, a, b = self.cfg, *self.layers
        row = kv_row(c.head_dim, self.engine.kv_cache_dtype)
        return (b - a, 2, self.spec.num_blocks, self.engine.block_size, c.num_kv_heads, row)

    def forward(self, req: pb.StageForwardRequest):
        """The next stage's request, or (last stage) the logits answer."""
        wire = bytes_wire(req.step_wire)
        wire.check(self.engine.block_size, self.spec.num_blocks, self.max_positions)
        hidden = message_tensor(req.hidden, (wire.num_tokens, self.cfg.hidden_size))
        t0, c0 = time.perf_counter(), time.thread_time()
        out = self.shard.forward(wire, hidden=hidden)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        c = self.counters
        c.busy_s += time.perf_counter() - t0
        c.cpu_s += time.thread_time() - c0
        c.micro_batches += 1
        c.tokens += wire.num_tokens
        if self.is_last:
            return pb.StageForwardResponse(
                micro_batch_id=req.micro_batch_id, logits=tensor_message(out)
            )
        return pb.StageForwardRequest(
            micro_batch_id=req.micro_batch_id,
            step_wire=req.step_wire,
            hidden=tensor_message(out),
            results_stream=req.results_stream,
        )

    def read_kv(self, block_ids: list[int]) -> list[pb.KVChunk]:
        self._check_blocks(block_ids)
        return list(kv_chunks(self.shard.read_kv(block_ids), self.kv_format))

    def write_kv(self, block_ids: list[int], data: torch.Tensor) -> None:
        self._check_blocks(block_ids)
        if data.shape[2] != len(block_ids):
            raise ValueError(f"KV of {data.shape[2]} blocks for {len(block_ids)} block ids")
        self.shard.write_kv(block_ids, data)

    def _check_blocks(self, block_ids: list[int]) -> None:
        if not block_ids or not 0 <= min(block_ids) <= max(block_ids) < self.spec.num_blocks:
            raise ValueError(f"block ids must be 1+ ids inside the pool of {self.spec.num_blocks}")

    def stats(self) -> pb.StageStatsResponse:
        c = self.counters
        return pb.StageStatsResponse(
            first_layer=self.layers[0],
            last_layer=self.layers[1],
            busy_seconds=c.busy_s,
            cpu_seconds=c.cpu_s,
            micro_batches=c.micro_batches,
            tokens=c.tokens,
            uptime_seconds=time.monotonic() - self.started,
        )

    def close(self) -> None:
        close = getattr(self.shard, "close", None)
        if close is not None:
            close()


class StageServicer(rpc.StageServicer):
    def __init__(
        self, runtime: StageRuntime, max_in_flight: int, compute: ThreadPoolExecutor | None = None
    ) -> None:
        self.rt = runtime
        self.max_in_flight = max_in_flight
        self.instance_id = uuid.uuid4().hex
        # One thread for all torch work; best the one that loaded the shard (engine_loop.py
        # says why).
        self.compute = compute or ThreadPoolExecutor(1, thread_name_prefix="stage-compute")
        self.next_address = ""
        self._next_channel: grpc.aio.Channel | None = None
        self.broken = ""  # why this stage can't serve any more, once it can't
        # Last stage: the open Results streams, by id; None in a queue ends its stream.
        self._results: dict[str, asyncio.Queue] = {}

    async def _on_compute(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.compute, fn, *args)

    async def Handshake(self, request, context):
        if self.broken:
            await context.abort(grpc.StatusCode.UNAVAILABLE, self.broken)
        diffs = layout_differences(request.expected, self.rt.layout)
        if self.rt.is_last and request.next_stage:
            diffs.append("this is the last stage, yet a next stage was named")
        if not self.rt.is_last and not request.next_stage:
            diffs.append("this stage is not the last, yet no next stage was named")
        if diffs:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "; ".join(diffs))
        if request.next_stage != self.next_address:
            if self._next_channel is not None:
                await self._next_channel.close()
            self.next_address = request.next_stage
            self._next_channel = open_channel(
                self.next_address, TLSConfig.from_env(), STAGE_CHANNEL_OPTIONS
            )
            log.info("stage %d forwards to %s", self.rt.spec.index, self.next_address)
        return pb.StageHandshakeResponse(layout=self.rt.layout, instance_id=self.instance_id)

    async def Forward(self, request_iterator, context) -> AsyncIterator[pb.StageForwardResponse]:
        if self.broken:
            await context.abort(grpc.StatusCode.UNAVAILABLE, self.broken)
        if not self.rt.is_last and self._next_channel is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no handshake yet")
        # Futures of the micro-batches read so far, in order; None once the caller is done.
        pending: asyncio.Queue = asyncio.Queue(self.max_in_flight)

        loop = asyncio.get_running_loop()

        async def read() -> None:
            async for req in request_iterator:
                # Submitted at once, so the compute thread takes them in arrival order.
                fut = loop.run_in_executor(self.compute, self.rt.forward, req)
                await pending.put((req.results_stream, fut))
            await pending.put(None)

        reader = asyncio.create_task(read())
        named: set[str] = set()  # Results streams this Forward answered on
        ended_well = False
        try:
            if self.rt.is_last:
                while (item := await pending.get()) is not None:
                    results_id, fut = item
                    resp = await fut
                    if not results_id:
                        yield resp
                        continue
                    outlet = self._results.get(results_id)
                    if outlet is None:
                        await context.abort(
                            grpc.StatusCode.FAILED_PRECONDITION,
                            f"no Results stream {results_id!r} is open on this stage",
                        )
                    named.add(results_id)
                    outlet.put_nowait(resp)
            else:
                async for resp in self._relay(pending, context):
                    yield resp
            await reader
            ended_well = True
        except (ValueError, KVCodecError) as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad micro-batch: {e}")
        except grpc.aio.AbortError:
            raise
        except ShardGroupError as e:
            await self._group_failed(context, e)
        except Exception as e:
            log.exception("stage %d: forward failed", self.rt.spec.index)
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
        finally:
            reader.cancel()
            _retrieved(reader)
            # Every answer is in: end those streams. After an error they stay open, so the
            # first stage learns why from this Forward's status, then cancels them itself.
            for results_id in named if ended_well else ():
                if (outlet := self._results.get(results_id)) is not None:
                    outlet.put_nowait(None)

    async def Results(self, request, context) -> AsyncIterator[pb.StageForwardResponse]:
        if not self.rt.is_last:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "only the last stage answers on Results"
            )
        results_id = request.stream_id
        if not results_id or len(results_id) > 128 or results_id in self._results:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "stream_id must be 1-128 characters and not already open",
            )
        if len(self._results) >= MAX_RESULTS_STREAMS:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{MAX_RESULTS_STREAMS} Results streams are open on this stage already",
            )
        outlet: asyncio.Queue = asyncio.Queue()
        self._results[results_id] = outlet
        try:
            yield pb.StageForwardResponse()  # open: micro-batches may name it now
            while (resp := await outlet.get()) is not None:
                yield resp
        finally:
            self._results.pop(results_id, None)

    async def _relay(self, pending: asyncio.Queue, context) -> AsyncIterator:
        """Send each computed micro-batch down the chain; yield what comes back."""
        assert self._next_channel is not None
        call = rpc.StageStub(self._next_channel).Forward()
        failed: list[BaseException] = []

        async def send() -> None:
            try:
                while (item := await pending.get()) is not None:
                    msg = await item[1]
                    try:
                        await call.write(msg)
                    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                        return  # the call is over; reading it says why
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    await call.done_writing()
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # our compute failed: stop the chain too
                failed.append(e)
                call.cancel()
                raise

        sender = asyncio.create_task(send())
        try:
            async for resp in call:
                yield resp
        except grpc.aio.AioRpcError as e:
            if failed:
                raise failed[0] from None
            code = grpc.StatusCode.UNAVAILABLE if e.code() in _GONE else e.code()
            await context.abort(code, f"next stage {self.next_address}: {e.code().name}: "
                                      f"{e.details()}")  # fmt: skip
        except asyncio.CancelledError:
            if failed:
                raise failed[0] from None
            raise
        finally:
            sender.cancel()
            call.cancel()
            _retrieved(sender)
        if failed:
            raise failed[0]

    async def ReadKV(self, request, context):
        try:
            chunks = await self._on_compute(self.rt.read_kv, list(request.block_ids))
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except ShardGroupError as e:
            await self._group_failed(context, e)
        for chunk in chunks:
            yield chunk

    async def WriteKV(self, request_iterator, context):
        block_ids: list[int] = []
        assembler = None
        try:
            async for msg in request_iterator:
                if assembler is None:
                    block_ids = list(msg.block_ids)
                    assembler = kv_assembler(msg.chunk.header, self.rt.kv_format, self.rt.pool)
                assembler.add(msg.chunk.offset, msg.chunk.data)
            if assembler is None:
                raise ValueError("no KV sent")
            data = assembler.finish()
            await self._on_compute(self.rt.write_kv, block_ids, data)
        except (ValueError, KVCodecError) as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except ShardGroupError as e:
            await self._group_failed(context, e)
        return pb.StageWriteKVResponse(num_blocks=len(block_ids))

    async def _group_failed(self, context, e: ShardGroupError) -> None:
        # Our tensor-parallel group is gone, so this stage is: say so from now on.
        self.broken = f"stage {self.rt.spec.index}'s tensor-parallel group failed: {e}"
        log.error("%s", self.broken)
        await context.abort(grpc.StatusCode.UNAVAILABLE, self.broken)

    async def Stats(self, request, context):
        return self.rt.stats()

    async def close(self) -> None:
        if self._next_channel is not None:
            await self._next_channel.close()
        await asyncio.to_thread(self.compute.shutdown)
        self.rt.close()


def _retrieved(task: asyncio.Task) -> None:
    """Mark a finished helper task's error as seen: the stream's own status reports it."""
    if task.done() and not task.cancelled():
        task.exception()


# ---- the process -----------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("stage")
    g.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback)")
    g.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 = any free port")
    g.add_argument(
        "--stage-index",
        type=int,
        default=None,
        help="which stage this is, 1..P-1 (stage 0 is the worker); its layers follow from "
        "--pipeline-stages and --pipeline-layers as on the worker",
    )
    g.add_argument(
        "--num-kv-blocks",
        type=int,
        default=None,
        help="KV pool size in blocks (default: from --kv-cache-mib, as the worker computes it)",
    )
    g.add_argument("--max-in-flight", type=int, default=16, help="micro-batches read ahead")
    g.add_argument("--port-file", default=None, help="write the bound port here once serving")
    g.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    g.add_argument("--spec-json", default=None, help=argparse.SUPPRESS)  # from the worker
    g.add_argument("--drain-seconds", type=float, default=5.0)
    g.add_argument("--log-level", default="INFO")
    add_tls_arguments(parser)  # a stage its worker starts inherits them (SPLITSERVE_TLS_*)
    add_engine_args(parser)


def load_runtime(args: argparse.Namespace) -> StageRuntime:
    """Resolve this stage's spec and build its shard (the slow part: loading weights)."""
    if args.spec_json:
        spec = StageSpec.from_json(args.spec_json)
        ckpt = None if spec.random_model else open_checkpoint(spec.engine.model)
    else:
        if args.stage_index is None:
            raise ValueError("give --stage-index (1..P-1)")
        engine = engine_config(args)
        ckpt = open_checkpoint(engine.model)
        engine = resolve_quantization(engine, ckpt)
        explicit = list(engine.pipeline_layers) if engine.pipeline_layers else None
        ranges = stage_layer_ranges(ckpt.config, engine.pipeline_stages, explicit)
        if not 1 <= args.stage_index < len(ranges):
            raise ParallelConfigError(
                f"--stage-index must be 1..{len(ranges) - 1} for {len(ranges)} pipeline stages"
            )
        a, b = ranges[args.stage_index]
        blocks = args.num_kv_blocks or plan_num_blocks(ckpt.config, engine)
        spec = StageSpec(args.stage_index, a, b, blocks, engine)
    if spec.engine.num_threads:
        torch.set_num_threads(spec.engine.num_threads)
    if ckpt is None:
        assert spec.random_model is not None
        cfg, tensors, num = spec.random_model, None, 0
    else:
        cfg, tensors, num = ckpt.config, ckpt.refs(), ckpt.num_tensors
    layers = (spec.first_layer, spec.last_layer)
    shard = build_stage_shard(cfg, spec.engine, layers, spec.num_blocks, tensors, num)
    if ckpt is not None:
        ckpt.drop_file_pages()
    return StageRuntime(spec, cfg, shard)


async def serve(
    args: argparse.Namespace, runtime: StageRuntime, compute: ThreadPoolExecutor | None = None
) -> None:
    name = f"stage-{runtime.spec.index}"
    tls = TLSConfig.from_args(args)
    server = ServiceServer(name, f"{args.host}:{args.port}", options=STAGE_CHANNEL_OPTIONS, tls=tls)
    servicer = StageServicer(runtime, args.max_in_flight, compute)
    rpc.add_StageServicer_to_server(servicer, server.grpc)

    async def on_started() -> None:
        if args.port_file:
            tmp = f"{args.port_file}.tmp"
            with open(tmp, "w") as f:
                f.write(str(server.port))
            os.replace(tmp, args.port_file)

    watcher = None
    if args.parent_pid:
        watcher = asyncio.create_task(_watch_parent(args.parent_pid, server))
    try:
        await server.run(
            [full_service_name("Stage")], drain_seconds=args.drain_seconds, on_started=on_started
        )
    finally:
        if watcher is not None:
            watcher.cancel()
        await servicer.close()


async def _watch_parent(pid: int, server: ServiceServer) -> None:
    while os.getppid() == pid:
        await asyncio.sleep(PARENT_POLL_S)
    log.warning("the worker (pid %d) is gone; stopping", pid)
    # An orderly stop, and a hard one should that hang.
    timer = threading.Timer(EXIT_AFTER_PARENT_S, os._exit, (1,))
    timer.daemon = True  # must not keep the process alive itself
    timer.start()
    server.request_stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m splitserve.executors.pipeline.stage",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging("stage", args.log_level)
    follow_launcher()
    if args.parent_pid and os.getppid() != args.parent_pid:
        return 1  # the worker died before we got going
    fast_gil_handoff()
    heap.tune()
    compute = ThreadPoolExecutor(1, thread_name_prefix="stage-compute")
    try:
        tls = TLSConfig.from_args(args)  # a bad flag fails before the slow load
        if tls is not None:
            tls.export_env()  # the channel to the next stage dials with it
        runtime = compute.submit(load_runtime, args).result()
    except (ValueError, ModelLoadError, OSError) as exc:
        log.error("stage: cannot start: %s", " ".join(str(exc).split()))
        compute.shutdown()
        return 1
    install_uvloop()
    try:
        asyncio.run(serve(args, runtime, compute))
    except OSError as exc:
        log.error("stage: cannot serve: %s", exc)
        return 1
    finally:
        with contextlib.suppress(Exception):
            runtime.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
