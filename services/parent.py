"""A service that dies with the process that launched it.

`splitserve up`, the benchmarks and the test fixtures start every service as a child. If the
launcher is killed with SIGKILL (the OOM killer, `kill -9`, a CI timeout) it cannot stop them,
and a mesh of orphans keeps its ports and gigabytes. Kept free of gRPC so that the launcher can
import it cheaply.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

PARENT_PID_ENV = "SPLITSERVE_PARENT_PID"


def follow_launcher() -> None:
    """Die with the launcher that started this service (`splitserve up`, a benchmark, a test
    fixture), even when it is killed with SIGKILL and can't stop its children: the launcher
    names itself in $SPLITSERVE_PARENT_PID and Linux sends us SIGTERM when it exits, which
    drains us as a Ctrl-C would. Without the variable (a service started by hand, by
    compose or Kubernetes) nothing changes."""
    expected = os.environ.pop(PARENT_PID_ENV, None)  # not for the processes we start
    if not expected or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0) != 0:
        logging.getLogger("splitserve").warning("could not follow the launcher (prctl failed)")
        return
    if os.getppid() != int(expected):  # it died before we asked: nobody will signal us
        logging.getLogger("splitserve").error("launcher %s is gone; exiting", expected)
        raise SystemExit(1)


def exec_following_launcher(argv: list[str]) -> None:
    """Become `argv` (a program that isn't ours, like llama-server) after asking to die with
    the launcher: the request survives exec. Never returns."""
    follow_launcher()
    os.execvp(argv[0], argv)


def wrapped(argv: list[str]) -> list[str]:
    """`argv` started through this module, so that it dies with the launcher (whose child_env
    names it) even though it can't call follow_launcher itself."""
    return [sys.executable, "-m", "splitserve.services.parent", *argv]


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m splitserve.services.parent PROGRAM [ARG...]")
    exec_following_launcher(sys.argv[1:])
