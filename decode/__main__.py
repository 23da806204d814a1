"""Run a decode worker: `python -m splitserve.decode --port 50080 --role decode|colocated ...`.

`--role colocated` is the same servicer under another name: a worker that prefills every prompt
itself (what the router talks to in colocated mode). A decode worker also prefills locally when
a request comes without KV. Binds loopback by default: only the router is public.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from splitserve.decode.service import DecodeServicer
from splitserve.services.server import ServiceServer, full_service_name
from splitserve.v1 import rpc
from splitserve.wire import kv_shm
from splitserve.workers.worker import Build, Worker, add_worker_arguments, run_worker


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--role", choices=("decode", "colocated"), default="decode")
    add_worker_arguments(parser, default_port=50080)
    parser.add_argument(
        "--kv-pull-timeout-s",
        type=float,
        default=10.0,
        help="deadline for pulling a prompt's KV (plus 1 s per 64 MiB); past it, recompute",
    )
    parser.add_argument(
        "--kv-reserve-wait-s",
        type=float,
        default=10.0,
        help="how long a remotely prefilled prompt waits for free KV blocks here before it is "
        "recomputed here instead (queued like any prompt); never refused (default: 10)",
    )
    parser.add_argument(
        "--kv-shm-dir",
        default=kv_shm.default_dir(),
        metavar="DIR",
        help="pull KV from a prefill worker on this host through a file made here: a tmpfs "
        "directory the prefill workers use too ('' streams every byte over gRPC; default: "
        "%(default)s)",
    )


def build(args: argparse.Namespace) -> Build:
    def make(worker: Worker, server: ServiceServer) -> DecodeServicer:
        servicer = DecodeServicer(
            worker,
            pull_timeout_s=args.kv_pull_timeout_s,
            reserve_wait_s=args.kv_reserve_wait_s,
            shm_dir=args.kv_shm_dir,
        )
        rpc.add_DecodeServicer_to_server(servicer, server.grpc)
        return servicer

    return make


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="splitserve decode", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_worker(args, args.role, [full_service_name("Decode")], build(args))


if __name__ == "__main__":
    sys.exit(main())
