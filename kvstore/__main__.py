"""Run the kvstore: `python -m splitserve.kvstore --backend memory|redis ...`.

Binds loopback by default: the kvstore is internal and unauthenticated, so exposing it is a
deliberate `--host` choice. `add_arguments` and `main` are what `splitserve kvstore` wires up.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import sys
from collections.abc import Sequence

from splitserve.kvstore.backends import BackendError, KVBackend, MemoryBackend, RedisBackend
from splitserve.kvstore.service import KVStoreServicer, Limits
from splitserve.services.server import (
    ServiceServer,
    configure_logging,
    full_service_name,
    install_uvloop,
)
from splitserve.services.tracing import init_tracing
from splitserve.v1 import rpc

log = logging.getLogger("splitserve")

DEFAULT_MEMORY_BYTES = 1 << 30
_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'1073741824', '512MiB', '2G' -> bytes (K/M/G/T are powers of 1024)."""
    m = _SIZE.match(text)
    if m is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 1073741824 or 512MiB)")
    return int(m.group(1)) * 1024 ** " kmgt".index(m.group(2).lower() or " ")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = Limits()
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback)")
    parser.add_argument("--port", type=int, default=50060)
    parser.add_argument("--backend", choices=("memory", "redis"), default="memory")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--redis-prefix", default="splitserve:kv:", help="key prefix in Redis")
    parser.add_argument(
        "--max-bytes",
        type=parse_size,
        default=None,
        help="memory: LRU capacity (default 1GiB); redis: set maxmemory + allkeys-lru "
        "(default: leave the server's configuration alone)",
    )
    parser.add_argument("--max-keys", type=int, default=d.max_keys, help="per request")
    parser.add_argument(
        "--max-payload-bytes", type=parse_size, default=d.max_payload_bytes, help="per block"
    )
    parser.add_argument("--drain-seconds", type=float, default=5.0)
    parser.add_argument("--log-level", default="INFO")


def build_backend(args: argparse.Namespace) -> KVBackend:
    if args.backend == "redis":
        return RedisBackend(args.redis_url, args.redis_prefix.encode(), max_bytes=args.max_bytes)
    return MemoryBackend(args.max_bytes or DEFAULT_MEMORY_BYTES)


async def serve(args: argparse.Namespace) -> None:
    backend = build_backend(args)
    await backend.start()
    try:
        limits = Limits(max_keys=args.max_keys, max_payload_bytes=args.max_payload_bytes)
        server = ServiceServer("kvstore", f"{args.host}:{args.port}")
        rpc.add_KVStoreServicer_to_server(KVStoreServicer(backend, limits), server.grpc)
        await server.run([full_service_name("KVStore")], drain_seconds=args.drain_seconds)
    finally:
        await backend.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="splitserve kvstore", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging("kvstore", args.log_level)
    init_tracing("kvstore")
    install_uvloop()
    try:
        asyncio.run(serve(args))
    except (BackendError, OSError) as exc:
        log.error("kvstore: cannot start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
