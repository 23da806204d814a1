"""Run a prefill worker: `python -m splitserve.prefill --port 50070 --kvstore HOST:PORT ...`.

Binds loopback by default: workers are internal, only the router is public. `add_arguments`
and `main` are what a `splitserve prefill` subcommand wires up.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from splitserve.prefill.leases import LeaseTable
from splitserve.prefill.service import PrefillServicer, add_prefill_service
from splitserve.services.server import ServiceServer, full_service_name
from splitserve.wire import kv_shm
from splitserve.workers.worker import Build, Worker, add_worker_arguments, run_worker

MIB = 1024 * 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_worker_arguments(parser, default_port=50070)
    g = parser.add_argument_group("KV leases")
    g.add_argument(
        "--lease-ttl-s", type=float, default=30.0, help="drop KV no decode pulled after this"
    )
    g.add_argument(
        "--max-lease-mib", type=int, default=2048, help="budget for KV held under leases, MiB"
    )
    g.add_argument(
        "--kv-shm-dir",
        default=kv_shm.default_dir(),
        metavar="DIR",
        help="write a lease into the file a decode worker on this host made in DIR (a tmpfs "
        "directory both use) instead of streaming its bytes ('' always streams; default: "
        "%(default)s)",
    )


def build(args: argparse.Namespace) -> Build:
    def make(worker: Worker, server: ServiceServer) -> PrefillServicer:
        leases = LeaseTable(
            args.max_lease_mib * MIB, args.lease_ttl_s, on_change=worker.metrics.lease_bytes.set
        )
        servicer = PrefillServicer(
            worker,
            leases,
            expire_interval_s=min(1.0, args.lease_ttl_s / 4),
            shm_dir=args.kv_shm_dir,
        )
        add_prefill_service(servicer, server.grpc)
        return servicer

    return make


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="splitserve prefill", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_worker(args, "prefill", [full_service_name("Prefill")], build(args))


if __name__ == "__main__":
    sys.exit(main())
