"""Free ports for meshes started by tests (other developers run meshes on the same machine)."""

from __future__ import annotations

import random
import socket

from splitserve.launcher import LaunchError, up
from splitserve.launcher.topology import Topology


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def up_args(*extra: str) -> list[str]:
    """`up` flags on ports nobody uses: free router ports, a random offset for the rest."""
    http, grpc_port = free_ports(2)
    for _ in range(50):
        offset = random.randrange(1000, 15000)
        argv = ["--http-port", str(http), "--grpc-port", str(grpc_port)]
        argv += ["--port-offset", str(offset), *extra]
        try:
            up.check_ports_free(Topology.from_args(up.build_parser().parse_args(argv)))
        except LaunchError:
            continue
        return argv
    raise AssertionError("no free port range")
