"""What the prefill and decode workers share (they never import each other).

- proto <-> engine conversions: SamplingOptions -> SamplingParams, logprobs, finish reasons;
- the one table that maps an error to a gRPC status code;
- GetLoad from the engine loop's last load snapshot;
- the process: common flags, loading the engine, metrics, the kvstore client, serving and the
  SIGTERM drain;
- joining a router's pool (`--router`): register once serving, deregister first on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn, Protocol

import grpc

from splitserve.engine.engine import CapacityError, RequestError
from splitserve.engine.guided import spec_from_proto
from splitserve.engine.outputs import RequestOutput
from splitserve.engine.sampling_params import SamplingParams, SamplingParamsError
from splitserve.executors.build import create_engine
from splitserve.executors.flags import add_engine_args, engine_config
from splitserve.executors.pipeline.executor import StageUnavailableError
from splitserve.executors.tensor_parallel import ShardGroupError
from splitserve.services import heap
from splitserve.services.parent import follow_launcher
from splitserve.services.security import TLSConfig, add_tls_arguments, open_channel
from splitserve.services.server import (
    CHANNEL_OPTIONS,
    ServiceServer,
    configure_logging,
    fast_gil_handoff,
    install_uvloop,
)
from splitserve.services.tracing import init_tracing, inject_metadata
from splitserve.v1 import pb, rpc
from splitserve.wire.kv_payload import load_mesh_secret
from splitserve.workers.engine_loop import (
    AsyncEngine,
    DuplicateRequestError,
    EngineClosedError,
    QueueFullError,
    RequestFailedError,
)
from splitserve.workers.kv_prefix import PrefixTier
from splitserve.workers.kvstore_client import KVStoreClient
from splitserve.workers.metrics import WorkerMetrics, start_metrics_server

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
        logit_bias=tuple(sorted(opts.logit_bias.items())),
        prompt_logprobs=opt("prompt_logprobs", None),
        guided=spec_from_proto(opts),
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


def prompt_logprobs(out: RequestOutput) -> list[pb.TokenLogprob]:
    """Prompt tokens 1.. (the first has none), when the engine computed them."""
    return [token_logprob(lp, top) for lp, top in out.prompt_logprobs or ()]


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
        (StageUnavailableError, grpc.StatusCode.UNAVAILABLE),
        (ShardGroupError, grpc.StatusCode.UNAVAILABLE),
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
        max_num_seqs=engine.engine.config.max_num_seqs,
        max_waiting_requests=engine.max_waiting_requests,
        num_total_blocks=load.num_blocks,
        max_queued_tokens=engine.max_queued_tokens,
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
        "--router",
        default=None,
        metavar="HOST:PORT",
        help="the router's internal address (its --internal-port, splitserve.v1.Registry): join "
        "its pool once serving (retried until it answers), leave it first thing on SIGTERM",
    )
    g.add_argument(
        "--kvstore-timeout-s",
        type=float,
        default=3.0,
        help="deadline of a kvstore lookup; past it the worker recomputes",
    )
    g.add_argument(
        "--mesh-secret-file",
        default=None,
        metavar="PATH",
        help="the secret kvstore blocks are signed and verified with (env SPLITSERVE_MESH_SECRET "
        "holds the secret itself); without one, blocks are unsigned",
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
    add_tls_arguments(parser)
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
    _check_router_flags(args)
    secret = load_mesh_secret(getattr(args, "mesh_secret_file", None))
    if args.kvstore and secret is None:
        log.warning(
            "kvstore blocks are unsigned: anyone who can write to the kvstore (or its Redis) can "
            "plant KV this worker will use; give every worker --mesh-secret-file"
        )
    worker_id = args.worker_id or f"{role}-{args.port}"
    metrics = WorkerMetrics(role, worker_id)
    # Bind before the slow load; mutual TLS when given certificates, else loopback only.
    server = ServiceServer(role, f"{args.host}:{args.port}", tls=TLSConfig.from_args(args))
    address = args.advertise_address or f"{args.host}:{server.port}"

    def broken(exc: BaseException) -> None:
        # A dead TP rank or pipeline stage doesn't come back: stop reporting SERVING, so the
        # router's health checks drop this replica (and compose's healthcheck can restart it).
        log.error("%s: the engine lost a rank or stage; reporting NOT_SERVING: %s", worker_id, exc)
        task = asyncio.ensure_future(server.set_serving(False))
        task.add_done_callback(lambda t: t.exception())

    cfg = engine_config(args)
    engine = await AsyncEngine.load(
        lambda: create_engine(cfg),
        args.max_waiting_requests,
        args.max_queued_tokens,
        metrics,
        on_broken=broken,
    )
    llm = engine.engine
    store = (
        KVStoreClient(args.kvstore, timeout_s=args.kvstore_timeout_s, metrics=metrics)
        if args.kvstore
        else None
    )
    prefix = PrefixTier(engine, store, metrics, secret=secret)
    worker = Worker(args, role, worker_id, address, engine, metrics, prefix)
    servicer = build(worker, server)
    membership = (
        RouterRegistration(args.router, address, role, llm.model_id, worker_id)
        if args.router
        else None
    )

    async def on_started() -> None:
        await servicer.start()
        if membership is not None:
            # Its first step runs once this returns and the server has gone SERVING (nothing
            # in between yields to the loop), so the router's first health check passes.
            membership.start()

    async def on_draining() -> None:
        if membership is not None:
            await membership.leave()  # no new work first; then let in-flight work finish
        await servicer.drain(args.drain_seconds)

    start_metrics_server(args.metrics_port, metrics.registry, args.host)
    await engine.start()
    try:
        await server.run(
            service_names,
            # The servicer's drain already waited for in-flight work; what is left is short.
            drain_seconds=GRPC_GRACE_S,
            on_started=on_started,
            on_draining=on_draining,
        )
    finally:
        if membership is not None:
            await membership.close()
        await servicer.close()
        await engine.shutdown()
        if store is not None:
            await store.close()


def _check_router_flags(args: argparse.Namespace) -> None:
    """Fail at startup, in one line, rather than register an address the router can't dial."""
    if not args.router:
        return
    host, sep, port = args.router.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--router must be HOST:PORT; got {args.router!r}")
    if not args.advertise_address and args.host in ("0.0.0.0", "::", "[::]", ""):
        raise ValueError(
            f"--router needs --advertise-address when binding {args.host!r}: the router must be "
            "told an address it can dial"
        )


# ---- joining the router's pool (data parallelism) ----------------------------------------------
REGISTER_TIMEOUT_S = 5.0  # one Register call (the router health-checks us before answering)
DEREGISTER_TIMEOUT_S = 2.0  # on SIGTERM: a router that is gone must not hold up the drain
REGISTER_BACKOFF_S = (0.5, 10.0)  # first and longest wait between tries while the router is down
REGISTER_WARN_AFTER_S = 15.0  # a router still unreachable this long after the first try: warn
REGISTER_REFRESH_S = 10.0  # re-register this often: a restarted router learns us back
# Answers that no retry can change: log them and serve on, unregistered.
_REFUSED = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
)
# The router may start after us (compose, `splitserve up`): reconnect quickly once it is there,
# not after gRPC's default backoff of up to two minutes.
_ROUTER_CHANNEL_OPTIONS = [
    *CHANNEL_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


class RouterRegistration:
    """This worker's membership in a router's pool.

    `start()` registers in the background, retrying with capped exponential backoff (and
    jitter) while the router is unreachable, then re-registers every `refresh_s`, which is
    idempotent. A router that refuses (wrong model, bad address) is logged once and the worker
    serves on. Nothing here ever raises into the worker: the router being down is normal.
    `leave()` stops that and deregisters, bounded by a short deadline.
    """

    def __init__(
        self,
        router: str,
        address: str,
        role: str,
        model: str,
        worker_id: str,
        *,
        refresh_s: float = REGISTER_REFRESH_S,
        backoff_s: tuple[float, float] = REGISTER_BACKOFF_S,
        timeout_s: float = REGISTER_TIMEOUT_S,
    ) -> None:
        self.router = router
        self.request = pb.RegisterRequest(
            address=address, role=role, model=model, worker_id=worker_id
        )
        self.refresh_s = refresh_s
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.registered = asyncio.Event()  # set once a Register succeeded
        self.refused: grpc.StatusCode | None = None
        self._channel: grpc.aio.Channel | None = None
        self._task: asyncio.Task[None] | None = None

    def _stub(self) -> rpc.RegistryStub:
        if self._channel is None:
            tls = TLSConfig.from_env()  # this worker's certificate: the Registry wants a worker's
            self._channel = open_channel(self.router, tls, _ROUTER_CHANNEL_OPTIONS)
        return rpc.RegistryStub(self._channel)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="router-registration")

    async def _run(self) -> None:
        delay = self.backoff_s[0]
        failures, warned = 0, False
        since = time.monotonic()
        while True:
            try:
                reply = await self._stub().Register(
                    self.request, timeout=self.timeout_s, metadata=inject_metadata()
                )
            except grpc.aio.AioRpcError as e:
                if e.code() in _REFUSED:
                    self.refused = e.code()
                    log.error(
                        "router %s refused to register %s: %s: %s; serving without it",
                        self.router, self.request.address, e.code().name, e.details(),
                    )  # fmt: skip
                    return
                failures += 1
                waited = time.monotonic() - since
                # A router that starts after its workers (`up`, compose) is normal: say so once;
                # warn once if it still doesn't answer after a while; the rest only repeats.
                level = logging.INFO if failures == 1 else logging.DEBUG
                if waited > REGISTER_WARN_AFTER_S and not warned:
                    level, warned = logging.WARNING, True
                log.log(
                    level,
                    "router %s not reachable (%s) after %.0f s; registering keeps being retried",
                    self.router, e.code().name, waited,
                )  # fmt: skip
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(2 * delay, self.backoff_s[1])
                continue
            if not self.registered.is_set() or reply.added:
                log.info(
                    "registered with router %s as %s %s (%s)",
                    self.router, self.request.role, self.request.address,
                    "healthy" if reply.healthy else "its health check has not passed yet",
                )  # fmt: skip
            self.registered.set()
            failures, delay, warned, since = 0, self.backoff_s[0], False, time.monotonic()
            await asyncio.sleep(self.refresh_s)

    async def _stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def leave(self) -> None:
        """Stop (re-)registering, then deregister; errors are logged, never raised."""
        await self._stop()
        try:
            reply = await self._stub().Deregister(
                pb.DeregisterRequest(address=self.request.address),
                timeout=DEREGISTER_TIMEOUT_S,
                metadata=inject_metadata(),
            )
            log.info("deregistered from router %s (known to it: %s)", self.router, reply.found)
        except grpc.aio.AioRpcError as e:
            log.info("could not deregister from router %s: %s", self.router, e.code().name)

    async def close(self) -> None:
        await self._stop()
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


def run_worker(
    args: argparse.Namespace, role: str, service_names: Sequence[str], build: Build
) -> int:
    configure_logging(role, args.log_level)
    follow_launcher()
    init_tracing(role)
    install_uvloop()
    fast_gil_handoff()
    heap.tune()
    try:
        tls = TLSConfig.from_args(args)
        if tls is not None:
            tls.export_env()  # its pipeline stages serve, and its channels dial, with it too
        asyncio.run(serve_worker(args, role, service_names, build))
    except (OSError, ValueError) as exc:  # a port in use, a model that won't load
        log.error("%s: cannot start: %s", role, " ".join(str(exc).split()))
        return 1
    return 0
