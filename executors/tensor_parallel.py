"""Tensor parallelism: one process per rank, driven by rank 0.

Rank 0 is the process that builds `TPExecutor` (the worker that owns the gRPC server and the
scheduler). It starts ranks 1..N-1 as child processes (`python -m
splitserve.executors.tensor_parallel`), which meet it on a TCP store bound to loopback. Every rank
builds its own `ModelShard`: children open the checkpoint named by the engine config themselves
(or draw the same seeded random weights) and keep only their slice, so no rank holds another's
weights.

Three torch.distributed backends join the ranks, used directly (nothing is registered in
torch.distributed's global state, so a process may hold several groups over time):

- `cmd` (gloo): the fixed-size command header. Children block on it between steps, so their
  side waits without a deadline; rank 0 only ever sends on it, under the step timeout.
- `ctrl` (gloo): the step's `StepWire` and KV blocks, always CPU tensors.
- `data`: the model's collectives (all-reduce, vocab all-gather) and a previous pipeline stage's
  hidden states. Gloo on CPU (the same backend as `ctrl`), NCCL on CUDA.

A step is: rank 0 broadcasts [STEP, wire length, hidden rows], the wire, the hidden states if
any; every rank runs `ModelShard.forward`; rank 0 returns what its shard returned (the
collectives inside the model leave every rank with the same result).

KV leaves and enters the group in the full-head layout of the group's layers, so what a TP=2
prefill exports is byte for byte what a TP=1 decode imports, and kvstore keys do not depend on
the TP size.

Failures: a rank that exits, hangs or raises makes rank 0's current or next command raise
`ShardGroupError` within the step timeout (a dead peer is usually seen at once: its sockets
close). The group is then dead for good: children are killed, and later calls fail at once.
Children exit when rank 0 goes away (their stdin, a pipe from rank 0, reaches EOF). They share
rank 0's process group and ignore SIGTERM and SIGINT: a worker's SIGTERM drain keeps its ranks,
a SIGKILL to the group takes them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

from splitserve.engine.config import EngineConfig, ModelConfig, RopeScaling, parse_dtype
from splitserve.executors.shard import ModelShard
from splitserve.model.attention import PagedAttentionBackend
from splitserve.model.loader import Weights
from splitserve.model.parallel import ParallelConfigError, ShardSpec, head_split
from splitserve.services import heap
from splitserve.wire.step_wire import StepWire

log = logging.getLogger("splitserve")

STEP, READ_KV, WRITE_KV, SHUTDOWN = range(4)
HEADER_LEN = 4  # [command, a, b, c]

# Defaults, overridden by the environment (read when a group starts), then by the engine config
# (--tensor-parallel-timeout-s) and the constructor.
STEP_TIMEOUT_S = 60.0  # any one collective, KV transfer or command send
STARTUP_TIMEOUT_S = 600.0  # every rank loaded and joined
IDLE_TIMEOUT = datetime.timedelta(days=36500)  # a child waiting for the next command
CLOSE_GRACE_S = 10.0  # how long close() waits for ranks to exit before killing them


class ShardGroupError(RuntimeError):
    """A tensor-parallel rank failed, hung or went away; the group cannot run any more."""


class ShardGroupStartError(ShardGroupError, ValueError):
    """A rank could not start (bad model, bad layout): one line, like a model load error."""


def _env_seconds(name: str, default: float) -> float:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds; got {value!r}") from None
    if seconds <= 0:
        raise ValueError(f"{name} must be positive; got {value!r}")
    return seconds


def _one_line(exc: BaseException | str) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, str) else f"{type(exc).__name__}: {text}"


# ---- the group ------------------------------------------------------------------------------
class _Group:
    """The backends joining the ranks, and the Collectives the model calls."""

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        size: int,
        device: torch.device,
        timeout: datetime.timedelta,
    ) -> None:
        self.rank, self.size, self.device = rank, size, device
        self.cmd = _gloo(store, "cmd", rank, size, timeout if rank == 0 else IDLE_TIMEOUT)
        self.ctrl = _gloo(store, "ctrl", rank, size, timeout)
        if device.type == "cuda":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.data = dist.ProcessGroupNCCL(dist.PrefixStore("data", store), rank, size, opts)
        else:
            self.data = self.ctrl

    # -- plumbing
    @staticmethod
    def broadcast(backend: Any, t: torch.Tensor) -> torch.Tensor:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        backend.broadcast([t], opts).wait()
        return t

    def send(self, t: torch.Tensor, dst: int) -> None:
        self.ctrl.send([t], dst, 0).wait()

    def recv(self, t: torch.Tensor, src: int) -> torch.Tensor:
        self.ctrl.recv([t], src, 0).wait()
        return t

    # -- Collectives (model/llama.py)
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_contiguous():
            x = x.contiguous()
        self.data.allreduce([x]).wait()
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's `x` on the last dim; the last dims may differ (uneven
        vocabulary ranges): each rank pads to the largest, and the padding is cut off."""
        width = torch.tensor([x.shape[-1]], dtype=torch.int64, device=x.device)
        widths = [torch.empty_like(width) for _ in range(self.size)]
        self.data.allgather([widths], [width]).wait()
        sizes = [int(w.item()) for w in widths]
        pad = max(sizes)
        x = torch.nn.functional.pad(x, (0, pad - x.shape[-1])).contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self.data.allgather([parts], [x]).wait()
        return torch.cat([p[..., :n] for p, n in zip(parts, sizes, strict=True)], dim=-1)


def _gloo(store: dist.Store, prefix: str, rank: int, size: int, timeout: datetime.timedelta):
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timeout
    # Every rank is on this machine: bind loopback, whatever the hostname resolves to.
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    return dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, size, opts)


class _LateComm:
    """Collectives whose group is attached after the shard is built (the shard loads its
    weights while the other ranks are still starting)."""

    group: _Group | None = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        assert self.group is not None
        return self.group.all_reduce(x)

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        assert self.group is not None
        return self.group.all_gather_last(x)


# ---- configuration on the command line -------------------------------------------------------
def _rank_device(engine_cfg: EngineConfig, rank: int) -> str:
    """Rank r runs on cuda:(base + r) under CUDA; on CPU every rank shares the CPU."""
    device = torch.device(engine_cfg.device)
    if device.type != "cuda":
        return engine_cfg.device
    return f"cuda:{(device.index or 0) + rank}"


def _encode_config(
    model_cfg: ModelConfig,
    engine_cfg: EngineConfig,
    layers: tuple[int, int],
    num_blocks: int,
    random_weights: bool,
) -> str:
    # `extra` is free-form and nothing in it builds a shard: it stays behind.
    engine = {f.name: getattr(engine_cfg, f.name) for f in dataclasses.fields(engine_cfg)}
    engine["extra"] = {}
    return json.dumps(
        {
            "model": dataclasses.asdict(model_cfg),
            "engine": engine,
            "layers": list(layers),
            "num_blocks": num_blocks,
            "random_weights": random_weights,
        }
    )


def _decode_config(text: str) -> tuple[ModelConfig, EngineConfig, tuple[int, int], int, bool]:
    raw = json.loads(text)
    model = dict(raw["model"])
    if model["rope_scaling"] is not None:
        model["rope_scaling"] = RopeScaling(**model["rope_scaling"])
    model["eos_token_ids"] = tuple(model["eos_token_ids"])
    # JSON turned the config's tuples into lists.
    engine = {k: tuple(v) if isinstance(v, list) else v for k, v in raw["engine"].items()}
    a, b = raw["layers"]
    return (
        ModelConfig(**model),
        EngineConfig(**engine),
        (a, b),
        raw["num_blocks"],
        raw["random_weights"],
    )


def _kv_senders(cfg: ModelConfig, size: int) -> list[int]:
    """The ranks whose KV heads rank 0 reads back: the first holder of each run of heads
    (replicas are equal, so one copy is enough)."""
    seen: set[tuple[int, int]] = set()
    out = []
    for r in range(size):
        heads = head_split(cfg, size, r).kv_heads
        if heads not in seen:
            seen.add(heads)
            out.append(r)
    return out


def _status_key(rank: int) -> str:
    return f"status/{rank}"


# ---- rank 0 ---------------------------------------------------------------------------------
class TPExecutor:
    """A tensor-parallel group of `engine_cfg.tensor_parallel_size` ranks, run from rank 0.

    The same shape as `ModelShard` (so a pipeline stage can be a TP group) plus the runner's
    `Executor` protocol. `shard` gives the layer range; its TP fields are filled in here.
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        engine_cfg: EngineConfig,
        shard: ShardSpec,
        num_blocks: int,
        tensors: Weights | None,
        num_tensors: int = 0,
        backend: PagedAttentionBackend | None = None,
        *,
        timeout_s: float | None = None,
        startup_timeout_s: float | None = None,
    ) -> None:
        self.cfg = model_cfg
        self.size = size = engine_cfg.tensor_parallel_size
        self.layers = layers = ShardSpec(0, 1, shard.first_layer, shard.last_layer).layers(
            model_cfg
        )
        self.specs = [ShardSpec(r, size, *layers) for r in range(size)]
        self.heads = [head_split(model_cfg, size, r) for r in range(size)]  # checks the layout
        self.dtype = parse_dtype(engine_cfg.dtype)
        self.num_blocks = num_blocks
        self.block_size = engine_cfg.block_size
        step_s = (
            timeout_s
            or engine_cfg.tensor_parallel_timeout_s
            or _env_seconds("SPLITSERVE_TP_TIMEOUT_S", STEP_TIMEOUT_S)
        )
        self.timeout = datetime.timedelta(seconds=step_s)
        self._startup_s = startup = startup_timeout_s or _env_seconds(
            "SPLITSERVE_TP_STARTUP_TIMEOUT_S", STARTUP_TIMEOUT_S
        )
        device = torch.device(_rank_device(engine_cfg, 0))
        if device.type == "cuda" and torch.cuda.device_count() < (device.index or 0) + size:
            raise ParallelConfigError(
                f"tensor parallel size {size} from {device} needs more CUDA devices than the "
                f"{torch.cuda.device_count()} visible"
            )
        self._kv_senders = _kv_senders(model_cfg, size)
        self._lock = threading.Lock()
        self._closed = False
        self._broken: str | None = None
        self._children: list[subprocess.Popen] = []
        self._group: _Group | None = None
        # This process's torch threads are its owner's (executors.build.create_engine sets them).
        if device.type == "cuda":
            torch.cuda.set_device(device)
        rank0_cfg = dataclasses.replace(engine_cfg, device=str(device))
        self._store = dist.TCPStore(
            "127.0.0.1",
            0,
            size,
            True,
            timeout=datetime.timedelta(seconds=startup),
            wait_for_workers=False,
        )
        try:
            config = _encode_config(model_cfg, engine_cfg, layers, num_blocks, tensors is None)
            self._children = [self._spawn(r, config) for r in range(1, size)]
            comm = _LateComm()
            # Rank 0 loads its shard while the children load theirs.
            self.shard = ModelShard(
                model_cfg, rank0_cfg, self.specs[0], num_blocks, tensors, num_tensors, comm, backend
            )
            self._wait_started(startup)
            self._group = comm.group = _Group(self._store, 0, size, device, self.timeout)
        except BaseException:
            self._kill_children()
            self._closed = True
            raise

    # -- lifecycle
    def _spawn(self, rank: int, config: str) -> subprocess.Popen:
        cmd = [
            sys.executable,
            "-m",
            "splitserve.executors.tensor_parallel",
            "--rank",
            str(rank),
            "--size",
            str(self.size),
            "--port",
            str(self._store.port),
            "--timeout-s",
            str(self.timeout.total_seconds()),
            "--startup-timeout-s",
            str(self._startup_s),
            "--config",
            config,
        ]
        # Same process group as rank 0, so a launcher's SIGKILL to the group takes the ranks
        # too; they ignore SIGTERM/SIGINT (rank 0 drains first, then stops them itself).
        return subprocess.Popen(cmd, stdin=subprocess.PIPE)

    def _wait_started(self, timeout_s: float) -> None:
        """Until every child reports its shard loaded; one line naming the first that failed."""
        pending = set(range(1, self.size))
        deadline = time.monotonic() + timeout_s
        while pending:
            for r in sorted(pending):
                if self._store.check([_status_key(r)]):
                    status = self._store.get(_status_key(r)).decode()
                    if status != "ok":
                        raise ShardGroupStartError(
                            f"tensor-parallel rank {r} could not start: {status}"
                        )
                    pending.discard(r)
                elif (code := self._children[r - 1].poll()) is not None:
                    raise ShardGroupStartError(
                        f"tensor-parallel rank {r} exited during startup ({_exit_text(code)})"
                    )
            if pending and time.monotonic() > deadline:
                raise ShardGroupStartError(
                    f"tensor-parallel ranks {sorted(pending)} did not start within {timeout_s:.0f}s"
                )
            if pending:
                time.sleep(0.05)

    def close(self) -> None:
        """Stop the ranks: a SHUTDOWN command, then kill whatever has not exited within
        CLOSE_GRACE_S (a hung rank, a step stuck holding the group). Idempotent."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + CLOSE_GRACE_S
        if self._broken is None and self._group is not None:
            # On a thread: a hung rank must not hold close() beyond the grace period (killing
            # the ranks below then fails the send, and the thread ends).
            sender = threading.Thread(target=self._send_shutdown, name="tp-shutdown", daemon=True)
            sender.start()
            sender.join(timeout=CLOSE_GRACE_S)
            if sender.is_alive():
                deadline = 0.0
        self._kill_children(grace_s=max(0.0, deadline - time.monotonic()))
        self._group = None
        self._store = None  # closes the rendezvous port

    def _send_shutdown(self) -> None:
        with self._lock, contextlib.suppress(Exception):
            self._send_header(SHUTDOWN)

    def _kill_children(self, grace_s: float = 0.0) -> None:
        for p in self._children:
            if p.stdin is not None:
                with contextlib.suppress(OSError):
                    p.stdin.close()  # the child's parent watch sees EOF
        deadline = time.monotonic() + grace_s
        for p in self._children:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    @property
    def pids(self) -> list[int]:
        """Process ids of ranks 1..N-1."""
        return [p.pid for p in self._children]

    # -- failure
    def _check_usable(self) -> None:
        if self._broken is not None:
            raise ShardGroupError(self._broken)
        if self._closed:
            raise ShardGroupError("the tensor-parallel group is closed")
        dead = self._dead_ranks()
        if dead:
            raise self._fail(f"{dead} before the command")

    def _dead_ranks(self, wait_s: float = 0.0) -> str:
        """'rank 1 (pid 123) killed by SIGKILL, ...' for every child that is gone; '' if none."""
        deadline = time.monotonic() + wait_s
        while True:
            gone = [
                f"rank {r} (pid {p.pid}) {_exit_text(code)}"
                for r, p in enumerate(self._children, 1)
                if (code := p.poll()) is not None
            ]
            if gone or time.monotonic() >= deadline:
                return ", ".join(gone)
            time.sleep(0.05)

    def _fail(self, cause: BaseException | str) -> ShardGroupError:
        """Mark the group dead, stop its ranks, and build the error to raise."""
        # A peer that just died may take a moment to be reaped; name it if it shows up.
        dead = self._dead_ranks(wait_s=1.0 if isinstance(cause, BaseException) else 0.0)
        reason = _one_line(cause)
        msg = f"tensor-parallel group of {self.size} failed: " + (
            f"{dead}; {reason}" if dead and dead not in reason else reason
        )
        self._broken = msg
        self._kill_children()
        return ShardGroupError(msg)

    def _command(self):
        """Run one command under the lock; any failure after the header went out kills the
        group (the ranks are no longer in step)."""
        return _Command(self)

    def _send_header(self, cmd: int, a: int = 0, b: int = 0, c: int = 0) -> None:
        assert self._group is not None
        header = torch.tensor([cmd, a, b, c], dtype=torch.int64)
        self._group.broadcast(self._group.cmd, header)

    # -- the shard's API
    @property
    def broken(self) -> str | None:
        return self._broken

    @property
    def weight_bytes(self) -> int:
        return self.shard.weight_bytes

    @property
    def kv_cache_bytes(self) -> int:
        return self.shard.kv_cache_bytes

    def forward(self, wire: StepWire, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (T, hidden) or float32 logits (S, vocab), as `ModelShard.forward`."""
        flat = wire.to_tensor()
        if hidden is not None:
            if tuple(hidden.shape) != (wire.num_tokens, self.cfg.hidden_size):
                raise ValueError(
                    f"hidden states of shape {tuple(hidden.shape)} for a step of "
                    f"{wire.num_tokens} tokens (hidden size {self.cfg.hidden_size})"
                )
            hidden = hidden.to(self.shard.device, self.dtype).contiguous()
        with self._command() as group:
            self._send_header(STEP, flat.numel(), -1 if hidden is None else hidden.shape[0])
            group.broadcast(group.ctrl, flat)
            if hidden is not None:
                group.broadcast(group.data, hidden)
            return self.shard.forward(wire, hidden)

    def execute(self, wire: StepWire) -> torch.Tensor:
        return self.forward(wire)

    def read_kv(self, block_ids: list[int]) -> torch.Tensor:
        """(local_layers, 2, n, block_size, num_kv_heads, head_dim): every rank's heads."""
        ids = torch.tensor(block_ids, dtype=torch.int64)
        with self._command() as group:
            self._send_header(READ_KV, len(block_ids))
            group.broadcast(group.ctrl, ids)
            own = self.shard.read_kv(block_ids)
            out = own.new_empty((*own.shape[:4], self.cfg.num_kv_heads, own.shape[5]))
            for r in self._kv_senders:
                k0, k1 = self.heads[r].kv_heads
                if r == 0:
                    part = own
                else:
                    part = torch.empty((*own.shape[:4], k1 - k0, own.shape[5]), dtype=own.dtype)
                    group.recv(part, r)
                out[:, :, :, :, k0:k1] = part
            return out

    def write_kv(self, block_ids: list[int], data: torch.Tensor) -> None:
        shape = self.shard.kv_cache.shape
        expected = (*shape[:2], len(block_ids), shape[3], self.cfg.num_kv_heads, shape[5])
        if tuple(data.shape) != expected or data.dtype != self.shard.kv_dtype:
            raise ValueError(
                f"KV of shape {tuple(data.shape)} {data.dtype} does not fit {expected} "
                f"{self.shard.kv_dtype}"
            )
        ids = torch.tensor(block_ids, dtype=torch.int64)
        with self._command() as group:
            self._send_header(WRITE_KV, len(block_ids))
            group.broadcast(group.ctrl, ids)
            for r in range(1, self.size):
                k0, k1 = self.heads[r].kv_heads
                group.send(data[:, :, :, :, k0:k1].to("cpu").contiguous(), r)
            k0, k1 = self.heads[0].kv_heads
            self.shard.write_kv(block_ids, data[:, :, :, :, k0:k1])


class _Command:
    def __init__(self, ex: TPExecutor) -> None:
        self.ex = ex

    def __enter__(self) -> _Group:
        self.ex._lock.acquire()
        try:
            self.ex._check_usable()
        except BaseException:
            self.ex._lock.release()
            raise
        assert self.ex._group is not None
        return self.ex._group

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc is not None and not isinstance(exc, ShardGroupError):
                raise self.ex._fail(exc) from exc
        finally:
            self.ex._lock.release()


def _exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


# ---- ranks 1..N-1 ----------------------------------------------------------------------------
def _watch_parent() -> None:
    """Exit as soon as rank 0 is gone: it holds the write end of our stdin."""
    with contextlib.suppress(Exception):
        while sys.stdin.buffer.read(4096):
            pass
    os._exit(0)


def _serve(shard: ModelShard, group: _Group, cfg: ModelConfig) -> None:
    sends_kv = group.rank in _kv_senders(cfg, group.size)
    layout = shard.kv_cache.shape  # (layers, 2, blocks, block_size, local KV heads, head_dim)
    while True:
        header = group.broadcast(group.cmd, torch.empty(HEADER_LEN, dtype=torch.int64))
        cmd, a, b, _ = header.tolist()
        if cmd == SHUTDOWN:
            return
        if cmd == STEP:
            flat = group.broadcast(group.ctrl, torch.empty(a, dtype=torch.int64))
            wire = StepWire.from_tensor(flat)
            hidden = None
            if b >= 0:
                hidden = torch.empty((b, cfg.hidden_size), dtype=shard.dtype, device=group.device)
                group.broadcast(group.data, hidden)
            shard.forward(wire, hidden)
        elif cmd in (READ_KV, WRITE_KV):
            ids = group.broadcast(group.ctrl, torch.empty(a, dtype=torch.int64)).tolist()
            if cmd == READ_KV:
                if sends_kv:
                    group.send(shard.read_kv(ids).to("cpu").contiguous(), 0)
            else:
                part = torch.empty((*layout[:2], a, *layout[3:]), dtype=shard.kv_dtype)
                shard.write_kv(ids, group.recv(part, 0))
        else:
            raise RuntimeError(f"unknown command {cmd}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="one tensor-parallel rank (started by rank 0)")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--timeout-s", type=float, default=STEP_TIMEOUT_S)
    p.add_argument("--startup-timeout-s", type=float, default=STARTUP_TIMEOUT_S)
    p.add_argument("--config", required=True, help="JSON: model and engine config, layer range")
    args = p.parse_args(argv)
    rank = args.rank
    heap.tune()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp-rank-{rank} %(message)s")
    for sig in (signal.SIGINT, signal.SIGTERM):  # rank 0 decides when we stop
        signal.signal(sig, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, name="parent-watch", daemon=True).start()
    startup = datetime.timedelta(seconds=args.startup_timeout_s)
    store = dist.TCPStore("127.0.0.1", args.port, args.size, False, timeout=startup)
    try:
        model_cfg, engine_cfg, layers, num_blocks, random_weights = _decode_config(args.config)
        engine_cfg = dataclasses.replace(engine_cfg, device=_rank_device(engine_cfg, rank))
        _set_threads(engine_cfg)
        device = torch.device(engine_cfg.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        tensors, num_tensors = None, 0
        if not random_weights:
            from splitserve.model.loader import open_checkpoint

            ckpt = open_checkpoint(engine_cfg.model)
            if ckpt.config != model_cfg:
                raise ValueError(
                    f"{ckpt.path} is not the model rank 0 runs: under tensor parallelism every "
                    "rank loads the checkpoint named by the engine config"
                )
            tensors, num_tensors = ckpt.refs(), ckpt.num_tensors
        comm = _LateComm()
        spec = ShardSpec(rank, args.size, *layers)
        shard = ModelShard(model_cfg, engine_cfg, spec, num_blocks, tensors, num_tensors, comm)
        if not random_weights:
            ckpt.drop_file_pages()
    except Exception as exc:
        if not isinstance(exc, ValueError):  # not a plain bad-input error: keep the trace
            log.exception("could not start")
        store.set(_status_key(rank), _one_line(exc))
        return 1
    store.set(_status_key(rank), "ok")
    timeout = datetime.timedelta(seconds=args.timeout_s)
    try:
        group = comm.group = _Group(store, rank, args.size, device, timeout)
        _serve(shard, group, model_cfg)
    except Exception as exc:  # rank 0 went away or the group broke: nothing left to serve
        log.warning("stopping: %s", _one_line(exc), exc_info=True)
        return 1
    return 0


def _set_threads(engine_cfg: EngineConfig) -> None:
    """The configured threads; else OMP_NUM_THREADS (the launcher's share of a host shared by
    several workers, or the operator's); else the CPU's cores shared evenly between the ranks."""
    if not engine_cfg.num_threads and os.environ.get("OMP_NUM_THREADS"):
        return  # torch read it at start-up
    n = engine_cfg.num_threads or max(1, (os.cpu_count() or 1) // engine_cfg.tensor_parallel_size)
    torch.set_num_threads(n)


if __name__ == "__main__":
    sys.exit(main())
