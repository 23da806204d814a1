"""Ports for the servers the tests start; no test uses a fixed one.

Other developers run meshes on this machine and pytest-xdist runs several test processes at
once. Single ports come from the OS (`free_ports` holds all n open until it has them, so they
are n different ports). A mesh's port plan is fixed bases plus `--port-offset`, the bases in
two clusters far apart (9100 and up, 50051 and up), each under PLAN_SPAN wide: each xdist
worker draws its offsets from a band of its own, the bands PLAN_SPAN apart, so the meshes of
two workers never plan the same port; a plan is used only once it is checked free.
"""

from __future__ import annotations

import os
import random

from splitserve.launcher import LaunchError, up
from splitserve.launcher.up import free_port, free_ports

__all__ = ["free_port", "free_ports", "offset_band", "up_args"]
from splitserve.launcher.topology import Topology

# --port-offset: the plan's highest port (pipeline stages, 50200 and up) must stay below 65536,
# and the 50051 cluster above Linux's ephemeral range (32768-60999), where an outgoing
# connection of any process may take a port between our check that it is free and the bind (a
# pipeline stage once lost 127.0.0.1:53416 that way); the 9100 cluster then lies at
# 20100-24400, below ROUTER_PORTS.
OFFSETS = range(11000, 15000)
PLAN_SPAN = 300  # wider than either cluster of bases in any plan a test starts


def offset_band() -> range:
    """This xdist worker's share of OFFSETS (all of it outside xdist)."""
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    width = len(OFFSETS) // count
    start = OFFSETS.start + index * width
    return range(start, start + width - PLAN_SPAN)


# The routers' own ports: below Linux's ephemeral range (32768-60999), where the OS never hands
# one to an outgoing connection between our check that it is free and the router's bind (a
# port the OS picked for `free_ports` is one it may pick again for any client at once: CI once
# lost a whole mesh to that).
ROUTER_PORTS = range(25000, 32700)


def router_port_pair() -> tuple[int, int]:
    """Two ports from this xdist worker's share of ROUTER_PORTS (checked free by the caller)."""
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    width = len(ROUTER_PORTS) // count
    http = random.randrange(
        ROUTER_PORTS.start + index * width, ROUTER_PORTS.start + (index + 1) * width - 1
    )
    return http, http + 1


def up_args(*extra: str) -> list[str]:
    """`up` flags on ports nobody uses: router ports below the ephemeral range, an offset from
    this worker's band."""
    band = offset_band()
    for _ in range(50):
        http, grpc_port = router_port_pair()
        argv = ["--http-port", str(http), "--grpc-port", str(grpc_port)]
        argv += ["--port-offset", str(random.choice(band)), *extra]
        try:
            up.check_ports_free(Topology.from_args(up.build_parser().parse_args(argv)))
        except LaunchError:
            continue
        return argv
    raise AssertionError("no free port range")
