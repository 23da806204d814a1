"""Processes the tests start, found through /proc: a process's children, and the
tensor-parallel ranks a process started (by their command line)."""

from __future__ import annotations

import os

RANK_MODULE = b"splitserve.executors.tensor_parallel"


def child_pids(pid: int) -> list[int]:
    """The process's children (e.g. a worker's pipeline stages), from every thread."""
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(p) for p in f.read().split()]
    return out


def rank_pids(parent: int) -> set[int]:
    """Pids of the tensor-parallel rank processes whose parent is `parent`."""
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and RANK_MODULE in cmd:
            out.add(int(entry))
    return out
