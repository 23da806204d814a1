"""Run the kvstore: `python -m splitserve.kvstore --backend memory|redis ...`.

Binds loopback by default: the kvstore is internal, so exposing it is a deliberate `--host`
choice. `add_arguments` and `main` are what `splitserve kvstore` wires up.

Redis: `--redis-url redis://[:PASSWORD@]HOST:PORT/DB` or `rediss://...` (TLS; the CA, and a
client certificate if Redis asks for one, from `--redis-tls-ca/--redis-tls-cert/--redis-tls-key`);
`--redis-password-file` keeps the password out of the command line. A Redis that refuses the
password, or can't be reached, at start stops the kvstore with a one-line error (exit status 1);
one that fails later makes the RPCs that need it UNAVAILABLE until it is back.

`--mesh-secret-file`, optional: the kvstore never needs the secret (workers verify the blocks'
signatures), but with it it refuses unsigned or forged Puts with INVALID_ARGUMENT. Unlike the
workers it does not read SPLITSERVE_MESH_SECRET: it holds the secret only when told explicitly.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import sys
from collections.abc import Sequence

from splitserve.kvstore.backends import (
    BackendError,
    KVBackend,
    MemoryBackend,
    RedisBackend,
    RedisTLS,
)
from splitserve.kvstore.service import KVStoreServicer, Limits
from splitserve.services.parent import follow_launcher
from splitserve.services.security import TLSConfig, add_tls_arguments
from splitserve.services.server import (
    ServiceServer,
    configure_logging,
    full_service_name,
    install_uvloop,
)
from splitserve.services.tracing import init_tracing
from splitserve.v1 import rpc
from splitserve.wire.kv_payload import load_mesh_secret

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
    parser.add_argument(
        "--redis-password-file",
        default=None,
        metavar="PATH",
        help="Redis AUTH password (the file's first line); instead of one in --redis-url",
    )
    parser.add_argument("--redis-tls-ca", default=None, metavar="PATH", help="rediss://: CA file")
    parser.add_argument(
        "--redis-tls-cert", default=None, metavar="PATH", help="rediss://: client certificate"
    )
    parser.add_argument(
        "--redis-tls-key", default=None, metavar="PATH", help="rediss://: client private key"
    )
    parser.add_argument("--redis-prefix", default="splitserve:kv:", help="key prefix in Redis")
    parser.add_argument(
        "--mesh-secret-file",
        default=None,
        metavar="PATH",
        help="optional: refuse Puts of blocks not signed with this mesh secret",
    )
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
    add_tls_arguments(parser)  # mutual TLS: only the mesh's services may Get or Put


def build_backend(args: argparse.Namespace) -> KVBackend:
    if args.backend == "redis":
        tls_files = (args.redis_tls_ca, args.redis_tls_cert, args.redis_tls_key)
        return RedisBackend(
            args.redis_url,
            args.redis_prefix.encode(),
            max_bytes=args.max_bytes,
            password=read_password(args.redis_password_file),
            tls=RedisTLS(*tls_files) if any(tls_files) else None,
        )
    return MemoryBackend(args.max_bytes or DEFAULT_MEMORY_BYTES)


def read_password(path: str | None) -> str | None:
    """The first line of `path` (a trailing newline is not part of the password)."""
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            password = f.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"redis password file {path}: {exc}") from None
    if not password:
        raise ValueError(f"redis password file {path} is empty")
    return password


async def serve(args: argparse.Namespace) -> None:
    secret = load_mesh_secret(args.mesh_secret_file, environ=None)
    backend = build_backend(args)
    await backend.start()
    try:
        limits = Limits(max_keys=args.max_keys, max_payload_bytes=args.max_payload_bytes)
        server = ServiceServer("kvstore", f"{args.host}:{args.port}", tls=TLSConfig.from_args(args))
        rpc.add_KVStoreServicer_to_server(KVStoreServicer(backend, limits, secret), server.grpc)
        await server.run([full_service_name("KVStore")], drain_seconds=args.drain_seconds)
    finally:
        await backend.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="splitserve kvstore", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging("kvstore", args.log_level)
    follow_launcher()
    init_tracing("kvstore")
    install_uvloop()
    try:
        asyncio.run(serve(args))
    except (BackendError, OSError, ValueError) as exc:
        log.error("kvstore: cannot start: %s", " ".join(str(exc).split()))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
