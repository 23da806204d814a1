"""What the prefill and decode workers share (they never import each other).

- proto <-> engine conversions: SamplingOptions -> SamplingParams, logprobs, finish reasons;
- the one table that maps an error to a gRPC status code;
- GetLoad from the engine loop's last load snapshot;
- the process: common flags, loading the engine, metrics, the kvstore client, serving and the
  SIGTERM drain.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn, Protocol

import grpc

from splitserve.engine.engine import CapacityError, LLMEngine, RequestError
from splitserve.engine.outputs import RequestOutput
from splitserve.engine.sampling_params import SamplingParams, SamplingParamsError
from splitserve.engine_args import add_engine_args, engine_config
from splitserve.services.engine_loop import (
    AsyncEngine,
    DuplicateRequestError,
    EngineClosedError,
    QueueFullError,
    RequestFailedError,
)
from splitserve.services.kv_prefix import PrefixTier
from splitserve.services.kvstore_client import KVStoreClient
from splitserve.services.metrics import WorkerMetrics, start_metrics_server
from splitserve.services.server import ServiceServer, configure_logging, install_uvloop
from splitserve.services.tracing import init_tracing
from splitserve.v1 import pb

log = logging.getLogger("splitserve")

GRPC_GRACE_S = 2.0  # after the drain: for RPCs still closing (total stays under compose's 35 s)
FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}


class OverloadedError(Exception):
    """A worker-side bound (other than the engine's) is full: RESOURCE_EXHAUSTED."""


# ---- proto <-> engine ----------------------------------------------------------------------
def sampling_params(opts: pb.SamplingOptions) -> SamplingParams:
    """The engine's params; `stop` strings are dropped (the router applies them to text)."""

    def opt(name: str, default: float | int | None) -> float | int | None:
        return getattr(opts, name) if opts.HasField(name) else default

    return SamplingParams(
        max_tokens=opt("max_tokens", 16),
        min_tokens=opts.min_tokens,
        temperature=opt("temperature", 1.0),
        top_p=opt("top_p", 1.0),
        top_k=opts.top_k,
        min_p=opts.min_p,
        repetition_penalty=opt("repetition_penalty", 1.0),
        presence_penalty=opts.presence_penalty,
        frequency_penalty=opts.frequency_penalty,
        seed=opt("seed", None),
        stop_token_ids=tuple(opts.stop_token_ids),
        ignore_eos=opts.ignore_eos,
        logprobs=opt("logprobs", None),
    )


def token_logprob(logprob: float | None, top: list[tuple[int, float]] | None) -> pb.TokenLogprob:
    return pb.TokenLogprob(
        logprob=logprob or 0.0,
        top=[pb.TopLogprob(token_id=t, logprob=lp) for t, lp in top or ()],
    )


def token_logprobs(out: RequestOutput) -> list[pb.TokenLogprob]:
    return [
        token_logprob(lp, top)
        for lp, top in zip(out.new_logprobs, out.new_top_logprobs, strict=True)
    ]


def usage(out: RequestOutput) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=out.num_prompt_tokens,
        completion_tokens=out.num_output_tokens,
        cached_prompt_tokens=out.num_cached_tokens,
    )


# ---- errors -> status codes -----------------------------------------------------------------
def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status a failed request gets. Order matters: subclasses before their bases."""
    table: list[tuple[type[BaseException], grpc.StatusCode]] = [
        (DuplicateRequestError, grpc.StatusCode.ALREADY_EXISTS),
        (CapacityError, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (SamplingParamsError, grpc.StatusCode.INVALID_ARGUMENT),
        (RequestError, grpc.StatusCode.INVALID_ARGUMENT),
        (EngineClosedError, grpc.StatusCode.UNAVAILABLE),
        (RequestFailedError, grpc.StatusCode.INTERNAL),
    ]
    for kind, code in table:
        if isinstance(exc, kind):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    code, message = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.error("request failed: %s", message, exc_info=exc)
    await context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")


def worker_load(engine: AsyncEngine, worker_id: str, role: str) -> pb.WorkerLoad:
    load = engine.load
    return pb.WorkerLoad(
        worker_id=worker_id,
        role=role,
        num_running=load.num_running + load.num_reserved,
        num_waiting=load.num_waiting,
        outstanding_tokens=load.outstanding_tokens,
        kv_usage=load.kv_block_usage,
        num_free_blocks=load.num_free_blocks,
        block_size=load.block_size,
        model=engine.engine.model_id,
    )


# ---- the process ----------------------------------------------------------------------------
def add_worker_arguments(parser: argparse.ArgumentParser, default_port: int) -> None:
    g = parser.add_argument_group("worker")
    g.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback)")
    g.add_argument("--port", type=int, default=default_port)
    g.add_argument("--worker-id", default=None, help="name in metrics and GetLoad")
    g.add_argument(
        "--advertise-address", default=None, help="HOST:PORT peers use (default: host:port)"
    )
    g.add_argument("--kvstore", default=None, help="HOST:PORT of the kvstore (optional)")
    g.add_argument(
        "--kvstore-timeout-s",
        type=float,
        default=3.0,
        help="deadline of a kvstore lookup; past it the worker recomputes",
    )
    g.add_argument("--metrics-port", type=int, default=0, help="Prometheus port; 0 = off")
    g.add_argument("--max-waiting-requests", type=int, default=256)
    g.add_argument("--max-queued-tokens", type=int, default=256 * 1024)
    g.add_argument(
        "--drain-seconds",
        type=float,
        default=25.0,
        help="on SIGTERM, how long in-flight requests (and unpulled KV) may take to finish",
    )
    g.add_argument("--log-level", default="INFO")
    add_engine_args(parser)


@dataclass
class Worker:
    """Everything a servicer is built from."""

    args: argparse.Namespace
    role: str
    worker_id: str
    address: str  # advertised host:port
    engine: AsyncEngine
    metrics: WorkerMetrics
    prefix: PrefixTier


class Servicer(Protocol):
    async def start(self) -> None: ...
    async def drain(self, timeout: float) -> None: ...
    async def close(self) -> None: ...


Build = Callable[[Worker, ServiceServer], Servicer]


async def serve_worker(
    args: argparse.Namespace, role: str, service_names: Sequence[str], build: Build
) -> None:
    worker_id = args.worker_id or f"{role}-{args.port}"
    metrics = WorkerMetrics(role, worker_id)
    server = ServiceServer(role, f"{args.host}:{args.port}")  # bind before the slow load
    address = args.advertise_address or f"{args.host}:{server.port}"
    llm = await asyncio.to_thread(LLMEngine.from_config, engine_config(args))
    engine = AsyncEngine(llm, args.max_waiting_requests, args.max_queued_tokens, metrics)
    store = KVStoreClient(args.kvstore, timeout_s=args.kvstore_timeout_s) if args.kvstore else None
    worker = Worker(
        args, role, worker_id, address, engine, metrics, PrefixTier(engine, store, metrics)
    )
    servicer = build(worker, server)
    start_metrics_server(args.metrics_port, metrics.registry, args.host)
    await engine.start()
    try:
        await server.run(
            service_names,
            # The servicer's drain already waited for in-flight work; what is left is short.
            drain_seconds=GRPC_GRACE_S,
            on_started=servicer.start,
            on_draining=lambda: servicer.drain(args.drain_seconds),
        )
    finally:
        await servicer.close()
        await engine.shutdown()
        if store is not None:
            await store.close()


GIL_SWITCH_INTERVAL_S = 0.0005


def run_worker(
    args: argparse.Namespace, role: str, service_names: Sequence[str], build: Build
) -> int:
    configure_logging(role, args.log_level)
    init_tracing(role)
    install_uvloop()
    # The engine thread gives up the GIL at every torch op and needs it back to issue the next;
    # with the default 5 ms switch interval a busy gRPC thread can make it wait that long each
    # time, hundreds of times a step.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    try:
        asyncio.run(serve_worker(args, role, service_names, build))
    except (OSError, ValueError) as exc:  # a port in use, a model that won't load
        log.error("%s: cannot start: %s", role, " ".join(str(exc).split()))
        return 1
    return 0
