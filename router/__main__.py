"""`python -m splitserve.router`: the public entry point, gRPC and HTTP on one event loop.

    python -m splitserve.router --grpc-port 50051 --http-port 8000 \\
        --prefill 127.0.0.1:50061 --decode 127.0.0.1:50071 --policy prefix_aware

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

from splitserve.engine.loader import ModelLoadError
from splitserve.services.server import ServiceServer, configure_logging, install_uvloop
from splitserve.services.tracing import init_tracing
from splitserve.v1 import rpc

from .app import MIB, Router, RouterConfig
from .grpc_api import SERVICE_NAME, InferenceServicer
from .http_api import HttpApi
from .policy import DEFAULT_ABS_THRESHOLD, DEFAULT_REL_THRESHOLD, POLICY_NAMES
from .registry_api import SERVICE_NAME as REGISTRY_SERVICE_NAME
from .registry_api import RegistryServicer

log = logging.getLogger("splitserve.router")


def add_arguments(p: argparse.ArgumentParser) -> None:
    net = p.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    net.add_argument("--grpc-port", type=int, default=50051, help="default: %(default)s")
    net.add_argument("--http-port", type=int, default=8000, help="default: %(default)s")
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
    limits.add_argument("--request-timeout", type=float, default=600.0, help="seconds")
    limits.add_argument("--health-interval", type=float, default=2.0, help="seconds")
    limits.add_argument("--drain-seconds", type=float, default=10.0, help="on SIGTERM")
    p.add_argument("--log-level", default="INFO")


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
    g.add_argument("--block-size", type=int, default=16, help="the workers' --block-size")


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    if args.max_inflight < 1 or args.max_body_bytes < 1:
        raise ValueError("--max-inflight and --max-body-bytes must be positive")
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
        block_size=args.block_size,
        max_inflight=args.max_inflight,
        max_body_bytes=args.max_body_bytes,
        health_interval_s=args.health_interval,
        drop_after_failures=args.drop_after_failures,
        request_timeout_s=args.request_timeout,
    )


def _addresses(values: Sequence[str]) -> tuple[str, ...]:
    return tuple(a.strip() for v in values for a in v.split(",") if a.strip())


async def serve(config: RouterConfig, args: argparse.Namespace) -> None:
    init_tracing("router")
    router = Router(config)
    if not router.workers.workers:
        log.warning("no workers listed: generations get UNAVAILABLE / 503 until some register")
    server = ServiceServer(
        "router",
        f"{args.host}:{args.grpc_port}",
        max_concurrent_rpcs=2 * config.max_inflight + 64,  # our own 429 comes first
    )
    rpc.add_InferenceServicer_to_server(InferenceServicer(router), server.grpc)
    rpc.add_RegistryServicer_to_server(RegistryServicer(router), server.grpc)
    http = HttpApi(router, args.host, args.http_port)

    async def on_started() -> None:
        await router.start()
        await http.start()

    async def on_draining() -> None:
        await router.drain(args.drain_seconds)
        await http.stop()

    try:
        await server.run(
            [SERVICE_NAME, REGISTRY_SERVICE_NAME],
            drain_seconds=args.drain_seconds,
            on_started=on_started,
            on_draining=on_draining,
        )
    finally:
        await http.stop()
        await router.close()


def run(args: argparse.Namespace) -> int:
    configure_logging("router", args.log_level)
    install_uvloop()
    try:
        config = config_from_args(args)
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
