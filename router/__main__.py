"""`python -m splitserve.router`: the public entry point, gRPC and HTTP on one event loop.

    python -m splitserve.router --grpc-port 50051 --http-port 8000 \\
        --prefill 127.0.0.1:50061 --decode 127.0.0.1:50071 --policy prefix_aware

Two planes, separate listeners: the public ports (--grpc-port: Inference, health, reflection;
--http-port: the OpenAI API), with server-side TLS when given --public-tls-cert/--public-tls-key;
and the internal port (--internal-port, default 50052: splitserve.v1.Registry and health), with
mutual TLS when given --tls-cert/--tls-key/--tls-ca, where only a certificate made for a worker
may register (router/registry_api.py). The same certificate dials the workers.

`add_arguments(parser)` and `run(args)` let `splitserve router ...` reuse the same flags.
SIGTERM/SIGINT: health goes NOT_SERVING, new requests are refused, in-flight ones finish
(up to --drain-seconds), exit status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from splitserve.model.loader import ModelLoadError
from splitserve.services.parent import follow_launcher
from splitserve.services.security import PublicTLS, TLSConfig, add_tls_arguments
from splitserve.services.server import (
    CHANNEL_OPTIONS,
    ServiceServer,
    configure_logging,
    install_uvloop,
)
from splitserve.services.tracing import init_tracing
from splitserve.v1 import rpc

from .app import (
    CUT_GRACE_S,
    MIB,
    Router,
    RouterConfig,
    add_reliability_arguments,
    reliability_config,
)
from .auth import add_auth_arguments, front_door_from_args
from .grpc_api import SERVICE_NAME, InferenceServicer
from .grpc_api import add_to_server as add_inference_servicer
from .http_api import HttpApi
from .policy import DEFAULT_ABS_THRESHOLD, DEFAULT_REL_THRESHOLD, POLICY_NAMES
from .registry_api import SERVICE_NAME as REGISTRY_SERVICE_NAME
from .registry_api import RegistryServicer
from .validation import DEFAULT_MAX_N

log = logging.getLogger("splitserve.router")


def add_arguments(p: argparse.ArgumentParser) -> None:
    net = p.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    net.add_argument("--grpc-port", type=int, default=50051, help="default: %(default)s")
    net.add_argument("--http-port", type=int, default=8000, help="default: %(default)s")
    _add_listener_arguments(p)
    model = p.add_argument_group("model (tokenizer and config only; no weights are loaded)")
    model.add_argument("--model", default=None, help="a .gguf file or HF folder; default model")
    model.add_argument("--served-model-name", default=None, help="default: the model's name")
    model.add_argument("--max-model-len", type=int, default=None, help="cap the context")
    workers = p.add_argument_group(
        "workers (repeatable, or comma-separated HOST:PORT; more may join at runtime through "
        "splitserve.v1.Registry, e.g. a worker started with --router)"
    )
    for role in ("prefill", "decode", "colocated"):
        workers.add_argument(f"--{role}", action="append", default=[], metavar="ADDR")
    workers.add_argument(
        "--drop-after-failures",
        type=int,
        default=3,
        metavar="N",
        help="drop a worker that registered itself once N health checks in a row fail (listed "
        "workers are kept: they may come back) (default: %(default)s)",
    )
    _add_routing_arguments(p)
    limits = p.add_argument_group("limits")
    limits.add_argument("--max-inflight", type=int, default=256, help="more get 429")
    limits.add_argument("--max-body-bytes", type=int, default=MIB, help="larger bodies get 413")
    limits.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        help="seconds: a request's deadline, or the cap on the caller's own (gRPC deadline, HTTP "
        "X-Request-Timeout header or `timeout` field); past it, 504 / DEADLINE_EXCEEDED",
    )
    limits.add_argument("--health-interval", type=float, default=2.0, help="seconds")
    limits.add_argument(
        "--drain-seconds",
        type=float,
        default=30.0,
        help="on SIGTERM, how long in-flight requests may take; longer than the workers' own "
        "drain (25 s), which starts once they have deregistered (default: %(default)s)",
    )
    add_auth_arguments(p)
    add_reliability_arguments(p)
    p.add_argument("--log-level", default="INFO")


def _add_listener_arguments(p: argparse.ArgumentParser) -> None:
    """The public ports' optional TLS, and the internal port (Registry) with its mutual TLS."""
    g = p.add_argument_group(
        "internal port (splitserve.v1.Registry and health: workers join the pools here; mutual "
        "TLS with --tls-*, and only a worker's certificate may register)"
    )
    g.add_argument("--internal-host", default=None, help="bind address (default: --host)")
    g.add_argument(
        "--internal-port",
        type=int,
        default=50052,
        help="0 picks a free one (default: %(default)s)",
    )
    add_tls_arguments(p)
    pub = p.add_argument_group("public TLS (gRPC and HTTP ports; no client certificates)")
    pub.add_argument("--public-tls-cert", default=None, metavar="PATH")
    pub.add_argument("--public-tls-key", default=None, metavar="PATH")


def _add_routing_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("routing")
    g.add_argument("--policy", default="prefix_aware", choices=POLICY_NAMES)
    g.add_argument(
        "--balance-abs-tokens",
        type=int,
        default=DEFAULT_ABS_THRESHOLD,
        help="prefix_aware: overloaded if load > min load + this ... (default: %(default)s)",
    )
    g.add_argument(
        "--balance-rel",
        type=float,
        default=DEFAULT_REL_THRESHOLD,
        help="... and load > this x min load (default: %(default)s)",
    )
    g.add_argument(
        "--disagg-min-tokens",
        type=int,
        default=256,
        help="prefill remotely only when this many prompt tokens are uncached (default: "
        "%(default)s)",
    )
    g.add_argument(
        "--prefill-queue-max-tokens",
        type=int,
        default=8192,
        help="prefill locally when every prefill worker has more outstanding tokens",
    )
    g.add_argument("--prefill-retries", type=int, default=2, help="other prefill workers to try")
    g.add_argument(
        "--decode-retries",
        type=int,
        default=2,
        help="other decode replicas to try when one fails before streaming a token",
    )
    g.add_argument(
        "--kv-dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="the workers' --dtype, for prefix hashes (default: %(default)s)",
    )
    g.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=["auto", "int8", "fp8_e4m3"],
        help="the workers' --kv-cache-dtype, for prefix hashes (default: %(default)s)",
    )
    g.add_argument("--block-size", type=int, default=16, help="the workers' --block-size")
    g.add_argument(
        "--max-n",
        type=int,
        default=DEFAULT_MAX_N,
        help="most choices per prompt a request may ask for (n, best_of) (default: %(default)s)",
    )


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    if args.max_inflight < 1 or args.max_body_bytes < 1:
        raise ValueError("--max-inflight and --max-body-bytes must be positive")
    if args.max_n < 1:
        raise ValueError("--max-n must be >= 1")
    if args.drop_after_failures < 1 or args.decode_retries < 0 or args.prefill_retries < 0:
        raise ValueError("--drop-after-failures must be >= 1, --*-retries >= 0")
    return RouterConfig(
        model=args.model,
        served_model_name=args.served_model_name,
        max_model_len=args.max_model_len,
        prefill=_addresses(args.prefill),
        decode=_addresses(args.decode),
        colocated=_addresses(args.colocated),
        policy=args.policy,
        balance_abs_tokens=args.balance_abs_tokens,
        balance_rel=args.balance_rel,
        disagg_min_tokens=args.disagg_min_tokens,
        prefill_queue_max_tokens=args.prefill_queue_max_tokens,
        prefill_retries=args.prefill_retries,
        decode_retries=args.decode_retries,
        kv_dtype=args.kv_dtype,
        kv_cache_dtype=args.kv_cache_dtype,
        block_size=args.block_size,
        max_inflight=args.max_inflight,
        max_body_bytes=args.max_body_bytes,
        max_n=args.max_n,
        health_interval_s=args.health_interval,
        drop_after_failures=args.drop_after_failures,
        request_timeout_s=args.request_timeout,
        **reliability_config(args),
    )


def _addresses(values: Sequence[str]) -> tuple[str, ...]:
    return tuple(a.strip() for v in values for a in v.split(",") if a.strip())


async def serve(config: RouterConfig, args: argparse.Namespace) -> None:
    init_tracing("router")
    front = front_door_from_args(args)  # before the model loads: a refused config fails fast
    tls = TLSConfig.from_args(args)
    public_tls = PublicTLS.resolve(args.public_tls_cert, args.public_tls_key)
    router = Router(config)
    if not router.workers.workers:
        log.warning("no workers listed: generations get UNAVAILABLE / 503 until some register")
    server = ServiceServer(
        "router",
        f"{args.host}:{args.grpc_port}",
        max_concurrent_rpcs=2 * config.max_inflight + 64,  # our own 429 comes first
        public=True,
        public_tls=public_tls,
    )
    internal = _internal_server(router, args, tls)
    add_inference_servicer(InferenceServicer(router, front.auth), server.grpc)
    http = HttpApi(
        router,
        args.host,
        args.http_port,
        auth=front.auth,
        limits=front.http,
        ssl_context=public_tls.ssl_context() if public_tls else None,
    )

    async def on_started() -> None:
        await internal.start([REGISTRY_SERVICE_NAME], reflect=False)
        await router.start()
        await http.start()
        await internal.set_serving(True)
        log.info("router internal port %s%s", internal.bound, " (mutual TLS)" if tls else "")

    async def on_draining() -> None:
        await internal.set_serving(False)
        await router.drain(args.drain_seconds)
        await http.stop()

    try:
        await server.run(
            [SERVICE_NAME],
            # router.drain already waited, then ended what was left: only closing is left.
            drain_seconds=CUT_GRACE_S,
            on_started=on_started,
            on_draining=on_draining,
        )
    finally:
        await internal.stop(grace=1.0)
        await http.stop()
        await router.close()


def _internal_server(
    router: Router, args: argparse.Namespace, tls: TLSConfig | None
) -> ServiceServer:
    """The Registry's own listener: never the public port, mutual TLS when given certificates
    (a plaintext one only on loopback), and no SO_REUSEPORT, so a second process can't quietly
    share it."""
    internal = ServiceServer(
        "router-internal",
        f"{args.internal_host or args.host}:{args.internal_port}",
        options=[*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)],
        tls=tls,
    )
    servicer = RegistryServicer(router, require_worker_cert=tls is not None)
    rpc.add_RegistryServicer_to_server(servicer, internal.grpc)
    return internal


def run(args: argparse.Namespace) -> int:
    configure_logging("router", args.log_level)
    follow_launcher()
    install_uvloop()
    try:
        config = config_from_args(args)
        tls = TLSConfig.from_args(args)
        if tls is not None:
            tls.export_env()  # the channels to the workers dial with the same certificate
        asyncio.run(serve(config, args))
    except (ModelLoadError, ValueError, OSError) as e:
        print(f"splitserve router: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="splitserve router",
        description="The public entry point: gRPC splitserve.v1.Inference and OpenAI-compatible "
        "HTTP, routing to prefill, decode and colocated workers.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
