"""Pipeline parallelism from the first stage: the worker that schedules runs layers [0, b0) and
streams hidden states to stage 1 (`python -m splitserve.executors.pipeline.stage`), which runs
its layers and passes them on; the last stage sends the logits straight back to stage 0 on a Results
stream that stage 0 opened to it (one hop, whatever P, and nothing for the middle stages to
relay: at batch 32 the logits are 6 MB a step against 74 KB of hidden states).

    engine thread (stage 0)                  stage 1 ... stage P-1
    -----------------------                  ---------------------
    split the step into M micro-batches
    for each: run layers [0, b0) ─ hidden ─► Forward stream ─► layers ─► ... ─► LM head
              (never waits on the send)                                           │
    collect M logit blocks, in order  ◄──── Results stream, straight back ◄───────┘

Sending goes through a queue that gRPC's own thread drains, so stage 0 computes micro-batch
i+1 while the later stages work on i; at most `MAX_IN_FLIGHT` micro-batches are unanswered.

Two schedules (`pipeline_schedule`):

- `step`: `execute` cuts each step into M micro-batches and returns once all M are back. A
  decode step takes about (M + P - 1) micro-batch times, so each stage is busy M / (M + P - 1)
  of it; the rest is the bubble while the pipeline fills and drains around every sampling.
- `overlap` (default): the engine keeps up to M groups of sequences, each one micro-batch, in
  flight (`submit` / `collect`, oldest first). A group's next step starts as soon as its own
  tokens are sampled, while the other groups are still in the stages, so there is no bubble
  between steps: with M >= P every stage always has a group to run.

Stages 1..P-1 are started here as child processes on free loopback ports (stopped by `close()`,
and exiting by themselves if this process dies), or reached at `pipeline_stage_addresses` when
they run elsewhere. Each is checked at start (same model, layer range, KV pool). KV moves in the
full model's layout: `read_kv` gathers every stage's layers, `write_kv` scatters them, so KV
transfer between workers and the kvstore work as without PP.

A stage that dies, can't be reached or answers nothing for `pipeline_timeout_s` fails the step
with `StageUnavailableError` (UNAVAILABLE for the worker's requests, which the router retries
elsewhere). A stage that comes back restarted has lost its KV, so this pipeline then stays
failed: the worker has to be restarted with it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import torch

from splitserve.engine.config import EngineConfig, ModelConfig, kv_cache_key, parse_dtype
from splitserve.executors.pipeline.processes import (
    StageProcess,
    StageSpec,
    StageStartError,
    stop_stages,
)
from splitserve.executors.shard import ModelShard
from splitserve.model.kv_quant import kv_format_name, kv_row
from splitserve.model.loader import Weights
from splitserve.model.parallel import ParallelConfigError, ShardSpec, stage_layer_ranges
from splitserve.v1 import pb, rpc
from splitserve.wire.kv_codec import DTYPE_NAMES, KVCodecError, dtype_name, format_name
from splitserve.wire.pipeline_codec import (
    STAGE_CHANNEL_OPTIONS,
    kv_assembler,
    kv_chunks,
    layout_differences,
    layout_message,
    message_tensor,
    tensor_message,
    wire_bytes,
)
from splitserve.wire.step_wire import StepWire

log = logging.getLogger("splitserve")

EXIT_GRACE_S = 1.0  # how long an unreachable child stage may take to show it exited
MAX_IN_FLIGHT = 16  # micro-batches sent and not yet answered, per stream
STARTUP_TIMEOUT_S = 600.0  # stages load their weights meanwhile
PROBE_TIMEOUT_S = 5.0  # is a stage still there, after a stream failed
KV_TIMEOUT_BASE_S = 30.0
KV_BYTES_PER_S = 20e6  # deadline of a KV read/write: base + bytes at this (slow) rate
# A stream that fails with one of these means the peer (or one behind it) is gone.
_GONE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class PipelineError(RuntimeError):
    """A pipeline step or KV move failed for a reason other than a dead stage."""


class StageUnavailableError(PipelineError):
    """A pipeline stage died, can't be reached or stopped answering; the request may be retried
    on another replica."""


class PipelineStartError(PipelineError, ValueError):
    """The pipeline could not be set up: a stage exited, never answered or doesn't match this
    worker (one line, like a model that won't load)."""


class StageRestartedError(StageUnavailableError):
    """A stage answers again, but as a new process: the KV this worker put there is gone."""


@dataclass(frozen=True)
class StageStats:
    """Cumulative counters of one stage since it started."""

    index: int
    first_layer: int
    last_layer: int
    busy_s: float  # wall time computing micro-batches
    cpu_s: float  # CPU time of the computing thread during those
    micro_batches: int
    tokens: int


def build_stage_shard(
    model_cfg: ModelConfig,
    engine_cfg: EngineConfig,
    layers: tuple[int, int],
    num_blocks: int,
    tensors: Weights | None,
    num_tensors: int = 0,
):
    """The layers of one stage: a tensor-parallel group when the config asks for one."""
    shard = ShardSpec(first_layer=layers[0], last_layer=layers[1])
    if engine_cfg.tensor_parallel_size > 1:
        from splitserve.executors.tensor_parallel import TPExecutor

        return TPExecutor(model_cfg, engine_cfg, shard, num_blocks, tensors, num_tensors, None)
    return ModelShard(model_cfg, engine_cfg, shard, num_blocks, tensors, num_tensors)


class _LinkBroken(Exception):
    pass


class _End:
    def __init__(self, reason: str) -> None:
        self.reason = reason


class _ForwardLink:
    """One Forward stream to stage 1, and a Results stream from the last stage that brings the
    logits straight back (one hop, not P-1, and no relaying on the stages between). Sends from
    a queue; each stream is read on a thread of its own into one inbox."""

    def __init__(
        self, first: rpc.StageStub, last: rpc.StageStub, name: str, timeout_s: float
    ) -> None:
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._next_id = 0
        self._next_answer = 0
        self._results_id = uuid.uuid4().hex
        self._opened = threading.Event()
        self._call: grpc.Future | None = None
        self._results = last.Results(pb.StageResultsRequest(stream_id=self._results_id))
        self._readers = [
            threading.Thread(target=self._read_results, name=f"{name}-results", daemon=True)
        ]
        self._readers[0].start()
        if not self._opened.wait(timeout_s):
            self._results.cancel()
            raise _LinkBroken(f"the last stage opened no Results stream in {timeout_s:.0f}s")
        if not self._inbox.empty():  # the Results call failed instead
            item = self._inbox.get()
            self._results.cancel()
            raise _LinkBroken(item.reason)
        self._call = first.Forward(self._requests())
        self._readers.append(threading.Thread(target=self._read, name=f"{name}-recv", daemon=True))
        self._readers[1].start()

    def _requests(self) -> Iterator[pb.StageForwardRequest]:
        # Runs on gRPC's thread: the bytes are made here, not on the engine thread.
        while (item := self._outbox.get()) is not None:
            mb_id, wire, hidden = item
            yield pb.StageForwardRequest(
                micro_batch_id=mb_id,
                step_wire=wire_bytes(wire),
                hidden=tensor_message(hidden),
                results_stream=self._results_id,
            )

    def _read_results(self) -> None:
        try:
            for resp in self._results:
                if self._opened.is_set():
                    self._inbox.put(resp)
                else:
                    self._opened.set()  # the first message: the stream is open
            self._inbox.put(_End("the last stage ended the Results stream"))
        except grpc.RpcError as e:
            self._inbox.put(_End(f"{e.code().name}: {e.details()}"))
        finally:
            self._opened.set()

    def _read(self) -> None:
        # Answers come on the Results stream; this one only ends, well or not.
        try:
            for resp in self._call:
                self._inbox.put(resp)
            self._inbox.put(_End("the stage ended the stream"))
        except grpc.RpcError as e:
            self._inbox.put(_End(f"{e.code().name}: {e.details()}"))

    def send(self, wire: StepWire, hidden: torch.Tensor) -> int:
        mb_id = self._next_id
        self._next_id += 1
        self._outbox.put((mb_id, wire, hidden))
        return mb_id

    def receive(self, timeout_s: float) -> pb.StageForwardResponse:
        try:
            item = self._inbox.get(timeout=timeout_s)
        except queue.Empty:
            raise _LinkBroken(f"no answer for {timeout_s:.0f}s") from None
        if isinstance(item, _End):
            self._inbox.put(item)
            raise _LinkBroken(item.reason)
        if item.micro_batch_id != self._next_answer:
            raise _LinkBroken(f"answer {item.micro_batch_id} came for {self._next_answer}")
        self._next_answer += 1
        return item

    def close(self) -> None:
        self._outbox.put(None)
        if self._call is not None:
            self._call.cancel()
        self._results.cancel()
        for reader in self._readers:
            reader.join(5.0)


class _RemoteStage:
    """Stage k's unary side: handshake, KV and stats, on a channel of its own."""

    def __init__(self, index: int, address: str, layout: pb.StageLayout, next_stage: str) -> None:
        self.index = index
        self.address = address
        self.layout = layout
        self.next_stage = next_stage
        self.instance_id: str | None = None
        # Mutual TLS when this worker has certificates (the environment carries them, as it
        # does to the stages this process starts); the one service module the engine uses.
        from splitserve.services.security import TLSConfig, open_sync_channel

        self.channel = open_sync_channel(address, TLSConfig.from_env(), STAGE_CHANNEL_OPTIONS)
        self.stub = rpc.StageStub(self.channel)

    @property
    def name(self) -> str:
        return f"pipeline stage {self.index} at {self.address}"

    @property
    def num_layers(self) -> int:
        return self.layout.last_layer - self.layout.first_layer

    def handshake(self, timeout_s: float, wait_for_ready: bool) -> None:
        req = pb.StageHandshakeRequest(expected=self.layout, next_stage=self.next_stage)
        try:
            resp = self.stub.Handshake(req, timeout=timeout_s, wait_for_ready=wait_for_ready)
        except grpc.RpcError as e:
            raise self.error("handshake", e) from None
        diffs = layout_differences(self.layout, resp.layout)
        if diffs:
            raise PipelineError(f"{self.name} does not match this worker: {'; '.join(diffs)}")
        if self.instance_id is None:
            self.instance_id = resp.instance_id
        elif resp.instance_id != self.instance_id:
            raise StageRestartedError(f"{self.name} was restarted and lost its KV cache")

    def error(self, what: str, e: grpc.RpcError) -> PipelineError:
        code, details = e.code(), e.details()
        kind = StageUnavailableError if code in _GONE else PipelineError
        return kind(f"{self.name}: {what} failed: {code.name}: {details}")

    @staticmethod
    def _kv_timeout(nbytes: int) -> float:
        return KV_TIMEOUT_BASE_S + nbytes / KV_BYTES_PER_S

    def read_kv(self, block_ids: list[int], pool: tuple[int, ...], dtype: torch.dtype | str):
        """This stage's KV of `block_ids`, which must fit `pool` (its cache's shape); `dtype`:
        the pool's, or its packed format's name."""
        req = pb.StageReadKVRequest(block_ids=block_ids)
        itemsize = DTYPE_NAMES[format_name(dtype)].itemsize
        nbytes = math.prod((*pool[:2], len(block_ids), *pool[3:])) * itemsize
        try:
            assembler = None
            for chunk in self.stub.ReadKV(req, timeout=self._kv_timeout(nbytes)):
                if assembler is None:
                    assembler = kv_assembler(chunk.header, dtype, pool)
                assembler.add(chunk.offset, chunk.data)
            if assembler is None:
                raise KVCodecError("no KV came")
            kv = assembler.finish()
            if kv.shape[2] != len(block_ids):
                raise KVCodecError(f"{kv.shape[2]} blocks came for {len(block_ids)}")
        except grpc.RpcError as e:
            raise self.error("reading KV", e) from None
        except KVCodecError as e:
            raise PipelineError(f"{self.name} sent bad KV: {e}") from None
        return kv

    def write_kv(self, block_ids: list[int], data: torch.Tensor, fmt: str | None = None) -> None:
        def messages() -> Iterator[pb.StageWriteKVRequest]:
            for i, chunk in enumerate(kv_chunks(data, fmt)):
                yield pb.StageWriteKVRequest(block_ids=block_ids if i == 0 else [], chunk=chunk)

        nbytes = data.numel() * data.element_size()
        try:
            self.stub.WriteKV(messages(), timeout=self._kv_timeout(nbytes))
        except grpc.RpcError as e:
            raise self.error("writing KV", e) from None

    def stats(self) -> StageStats:
        try:
            s = self.stub.Stats(pb.StageStatsRequest(), timeout=PROBE_TIMEOUT_S)
        except grpc.RpcError as e:
            raise self.error("stats", e) from None
        return StageStats(
            self.index,
            s.first_layer,
            s.last_layer,
            s.busy_seconds,
            s.cpu_seconds,
            s.micro_batches,
            s.tokens,
        )

    def close(self) -> None:
        self.channel.close()


class PipelineExecutor:
    """The runner's executor under PP (see the module docstring)."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        engine_cfg: EngineConfig,
        num_blocks: int,
        tensors: Weights | None,
        num_tensors: int = 0,
    ) -> None:
        stages = engine_cfg.pipeline_stages
        explicit = list(engine_cfg.pipeline_layers) if engine_cfg.pipeline_layers else None
        self.ranges = stage_layer_ranges(model_cfg, stages, explicit)
        self.cfg = model_cfg
        self.engine_cfg = engine_cfg
        self.num_blocks = num_blocks
        self.micro_batches = engine_cfg.micro_batches  # the bench changes it between runs
        self.schedule = engine_cfg.pipeline_schedule  # the bench changes it between runs
        self._pending: deque[StepWire] = deque()  # submitted, logits not collected yet
        self.peak_pending = 0  # the most micro-batches ever in flight at once
        self.timeout_s = engine_cfg.pipeline_timeout_s
        self.dtype = parse_dtype(engine_cfg.dtype)
        self.kv_cache_dtype = engine_cfg.kv_cache_dtype
        self.kv_format = kv_format_name(self.dtype, self.kv_cache_dtype)
        self.device = torch.device(engine_cfg.device)
        self._procs: list[StageProcess] = []
        self._stages: list[_RemoteStage] = []
        self._link: _ForwardLink | None = None
        self._broken: str | None = None  # set once the pipeline can never run again
        self._closed = False
        self._group_errors: tuple[type[BaseException], ...] = ()
        if engine_cfg.tensor_parallel_size > 1:
            from splitserve.executors.tensor_parallel import ShardGroupError

            self._group_errors = (ShardGroupError,)
        self._busy_s = self._cpu_s = 0.0
        self._micro_batches = self._tokens = 0
        # Children go down with this object even if nobody calls close().
        self._finalizer = weakref.finalize(self, _release, self._procs, self._stages)
        try:
            self._start(tensors, num_tensors)
        except (PipelineError, StageStartError) as e:
            self.close()
            raise PipelineStartError(str(e)) from e
        except BaseException:
            self.close()
            raise

    def _start(self, tensors, num_tensors: int) -> None:
        cfg, ecfg = self.cfg, self.engine_cfg
        addresses = list(ecfg.pipeline_stage_addresses or ())
        if ecfg.pipeline_stage_addresses is not None:
            if len(addresses) != len(self.ranges) - 1:
                raise ParallelConfigError(
                    f"--pipeline-stage-addresses lists {len(addresses)} stages; "
                    f"{len(self.ranges)} pipeline stages need {len(self.ranges) - 1}"
                )
        else:
            random_model = cfg if tensors is None else None
            for k, (a, b) in enumerate(self.ranges[1:], start=1):
                spec = StageSpec(k, a, b, self.num_blocks, ecfg, random_model)
                self._procs.append(StageProcess(spec))
        # Our own layers load while the children load theirs.
        self.local = build_stage_shard(
            cfg, ecfg, self.ranges[0], self.num_blocks, tensors, num_tensors
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        if self._procs:
            addresses = [p.wait_address(deadline) for p in self._procs]
        # a stage with another --kv-cache-dtype differs here, and the handshake says so
        dtype = kv_cache_key(dtype_name(self.dtype), ecfg.kv_cache_dtype)
        for k, address in enumerate(addresses, start=1):
            layout = layout_message(
                cfg, self.ranges[k], self.num_blocks, ecfg.block_size, dtype,
                ecfg.tensor_parallel_size,
            )  # fmt: skip
            nxt = addresses[k] if k < len(addresses) else ""
            self._stages.append(_RemoteStage(k, address, layout, nxt))
        if not self._procs:
            log.info("waiting for pipeline stages at %s", ", ".join(addresses))
        for stage in reversed(self._stages):  # each learns its successor, last one first
            stage.handshake(max(1.0, deadline - time.monotonic()), wait_for_ready=True)
        try:
            self._link = self._open_link()
        except _LinkBroken as e:
            raise PipelineError(f"pipeline streams: {e}") from None
        log.info(
            "pipeline of %d stages, layers %s, %d micro-batches",
            len(self.ranges), self.ranges, self.micro_batches,
        )  # fmt: skip

    # ---- executor interface ------------------------------------------------------------------
    @property
    def weight_bytes(self) -> int:
        return self.local.weight_bytes

    @property
    def broken(self) -> str | None:
        return self._broken

    @property
    def kv_cache_bytes(self) -> int:
        return self.local.kv_cache_bytes

    @property
    def overlap_groups(self) -> int:
        """Under the `overlap` schedule, the engine keeps this many groups' steps in flight."""
        return min(self.micro_batches, MAX_IN_FLIGHT) if self.schedule == "overlap" else 0

    def submit(self, wire: StepWire) -> None:
        """Run our layers on one group's step and send it on; `collect` gets its logits."""
        link = self._ready_link()
        if len(self._pending) >= MAX_IN_FLIGHT:
            raise PipelineError(f"more than {MAX_IN_FLIGHT} steps submitted and not collected")
        try:
            link.send(wire, self._compute(wire))
        except BaseException:
            self._drop_link()  # every step in flight is lost with it
            raise
        self._pending.append(wire)
        self.peak_pending = max(self.peak_pending, len(self._pending))

    def collect(self) -> torch.Tensor:
        """float32 logits of the oldest submitted step's sampled rows."""
        if not self._pending or self._link is None:
            raise PipelineError("no step in flight to collect")
        wire = self._pending.popleft()
        try:
            return self._receive(self._link, wire)
        except _LinkBroken as e:
            raise self._failure(str(e)) from None
        except BaseException:
            self._drop_link()
            raise

    def execute(self, wire: StepWire) -> torch.Tensor:
        """float32 logits (S, vocab) of the step's sampled rows, in order: the step cut into
        micro-batches, each submitted as soon as the in-flight window allows."""
        if self._pending:
            raise PipelineError("a step was run while submitted steps are in flight")
        logits: list[torch.Tensor] = []
        for part in wire.split(self.micro_batches):
            while len(self._pending) >= MAX_IN_FLIGHT:
                logits.append(self.collect())
            self.submit(part)
        while self._pending:
            logits.append(self.collect())
        return logits[0] if len(logits) == 1 else torch.cat(logits)

    def read_kv(self, block_ids: list[int]) -> torch.Tensor:
        """(num_layers, 2, n, block_size, num_kv_heads, head_dim): every stage's layers."""
        self._check_usable()
        with self._local_group():
            parts = [self.local.read_kv(block_ids)]
        for s in self._stages:
            parts.append(s.read_kv(block_ids, self._pool(s), self.kv_format).to(self.device))
        return torch.cat(parts)

    def write_kv(self, block_ids: list[int], data: torch.Tensor) -> None:
        self._check_usable()
        (a, b), *_ = self.ranges
        with self._local_group():
            self.local.write_kv(block_ids, data[a:b])
        for s, (a, b) in zip(self._stages, self.ranges[1:], strict=True):
            s.write_kv(block_ids, data[a:b], self.kv_format)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._drop_link()
        self._finalizer()  # stops the children, closes the channels
        close_local = getattr(getattr(self, "local", None), "close", None)
        if close_local is not None:
            close_local()

    # ---- observation -------------------------------------------------------------------------
    def stage_stats(self) -> list[StageStats]:
        """Every stage's cumulative busy time and micro-batch count, stage 0 first."""
        a, b = self.ranges[0]
        mine = StageStats(0, a, b, self._busy_s, self._cpu_s, self._micro_batches, self._tokens)
        return [mine, *(s.stats() for s in self._stages)]

    @property
    def stage_pids(self) -> list[int]:
        """The child stage processes' pids (none when the stages run elsewhere)."""
        return [p.pid for p in self._procs]

    # ---- internals ---------------------------------------------------------------------------
    def _compute(self, part: StepWire) -> torch.Tensor:
        t0, c0 = time.perf_counter(), time.thread_time()
        with self._local_group():
            hidden = self.local.forward(part)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._busy_s += time.perf_counter() - t0
        self._cpu_s += time.thread_time() - c0
        self._micro_batches += 1
        self._tokens += part.num_tokens
        return hidden

    def _receive(self, link: _ForwardLink, part: StepWire) -> torch.Tensor:
        resp = link.receive(self.timeout_s)
        try:
            logits = message_tensor(resp.logits, (part.num_samples, self.cfg.vocab_size))
            if logits.dtype != torch.float32:
                raise ValueError(f"{logits.dtype}, not float32")
        except ValueError as e:
            raise PipelineError(f"the last pipeline stage sent bad logits: {e}") from None
        return logits.to(self.device)

    def _pool(self, s: _RemoteStage) -> tuple[int, ...]:
        c = self.cfg
        row = kv_row(c.head_dim, self.kv_cache_dtype)
        return (s.num_layers, 2, self.num_blocks, s.layout.block_size, c.num_kv_heads, row)

    @contextlib.contextmanager
    def _local_group(self) -> Iterator[None]:
        """Our own tensor-parallel group failing is this stage dying, like any other."""
        try:
            yield
        except self._group_errors as e:
            self._broken = f"pipeline stage 0's tensor-parallel group failed: {e}"
            raise StageUnavailableError(self._broken) from e

    def _check_usable(self) -> None:
        if self._closed:
            raise PipelineError("the pipeline is closed")
        if self._broken is not None:
            raise StageUnavailableError(self._broken)

    def _ready_link(self) -> _ForwardLink:
        self._check_usable()
        if self._link is None:
            self._probe()  # raises if a stage is gone
            try:
                self._link = self._open_link()
            except _LinkBroken as e:
                raise self._failure(str(e)) from None
        return self._link

    def _open_link(self) -> _ForwardLink:
        first, last = self._stages[0].stub, self._stages[-1].stub
        return _ForwardLink(first, last, "stage1", max(1.0, self.timeout_s))

    def _drop_link(self) -> None:
        self._pending.clear()  # their answers are lost with the streams
        if self._link is not None:
            link, self._link = self._link, None
            with contextlib.suppress(Exception):
                link.close()

    def _failure(self, reason: str) -> PipelineError:
        """Why the stream broke: a stage that is gone, or something else."""
        self._drop_link()
        try:
            self._probe()
        except StageUnavailableError as e:
            return StageUnavailableError(f"{e} (stream: {reason})")
        return PipelineError(f"pipeline stream to stage 1 failed: {reason}")

    def _probe(self) -> None:
        """Raise StageUnavailableError if any stage exited, can't be reached or restarted."""
        self._check_exited()
        for stage in self._stages:
            try:
                stage.handshake(
                    min(PROBE_TIMEOUT_S, max(1.0, self.timeout_s)), wait_for_ready=False
                )
            except StageRestartedError as e:
                self._broken = str(e)
                raise
            except StageUnavailableError:
                # A child being killed closes its sockets before its exit can be seen: give
                # an unreachable child a moment to show it is gone for good.
                self._check_exited(EXIT_GRACE_S)
                raise

    def _check_exited(self, wait_s: float = 0.0) -> None:
        for proc in self._procs:
            code = proc.exit_code(wait_s)
            if code is not None:
                self._broken = (
                    f"pipeline stage {proc.spec.index} (pid {proc.pid}) exited with code {code}"
                )
                raise StageUnavailableError(self._broken)


def _release(procs: list[StageProcess], stages: list[_RemoteStage]) -> None:
    for s in stages:
        with contextlib.suppress(Exception):
            s.close()
    stop_stages(procs)
