"""`splitserve up`: the flags and the run are the launcher's (splitserve.launcher.up)."""

from __future__ import annotations

from splitserve.launcher import up


def add_parser(sub) -> None:
    p = sub.add_parser(
        "up",
        help="run the whole mesh (kvstore, prefill, decode, router) on this machine",
        description="Start kvstore, prefill and decode workers and the router as separate "
        "processes on loopback, wait until each reports SERVING, print the endpoints, and stop "
        "everything on Ctrl-C.",
    )
    up.add_arguments(p)
    p.set_defaults(run=up.run)
