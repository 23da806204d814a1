"""`splitserve certs`: the flags; the work is splitserve.launcher.certs'."""

from __future__ import annotations

import argparse

from splitserve.launcher import certs
from splitserve.launcher.certs import DEFAULT_DAYS, ROLES


def add_parser(sub) -> None:
    p = sub.add_parser(
        "certs",
        help="make a CA and one TLS certificate per service (mutual TLS inside the mesh)",
        description=certs.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, metavar="DIR", help="where to write (created 0700)")
    p.add_argument(
        "--service",
        action="append",
        default=[],
        metavar="NAME[:ROLE]",
        help=f"a service to certify (repeatable); ROLE one of {', '.join(ROLES)}",
    )
    p.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="HOST",
        help="another DNS name or IP address every certificate is valid for (repeatable)",
    )
    p.add_argument("--days", type=int, default=DEFAULT_DAYS, help="validity (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="a new CA, and every certificate again")
    p.add_argument("--mesh-secret", action="store_true", help="also write DIR/mesh-secret")
    p.add_argument("--redis-password", action="store_true", help="also write DIR/redis-password")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    directory, written = certs.make(
        args.out,
        args.service,
        args.san,
        days=args.days,
        force=args.force,
        mesh_secret=args.mesh_secret,
        redis_password=args.redis_password,
    )
    kept = "nothing new" if not written else ", ".join(written)
    print(f"splitserve certs: {directory}: {kept}")
    return 0
