"""Who used the CPUs during a measurement, and which CPUs a benchmark's processes may run on.

On a shared 2-core machine another process taking a core changes a result more than most code
changes do, so the benchmarks that start processes (mesh, dp, pipeline) account for it: a
`CpuMeter` splits the machine's busy time over an interval into ours (this process and the
ones it started) and everyone else's, from /proc (Linux). Pinning puts every thread of a
process on chosen CPUs, and `wait_for_quiet` holds a run back until the others are idle.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


# ---- CPU time ----------------------------------------------------------------------------------
def _clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU time the whole machine spent busy since boot, stolen time included (Linux)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / _clock_ticks()


def process_cpu_seconds(pid: int, with_reaped_children: bool = False) -> float:
    """utime + stime of a process (all its threads), 0 if it is gone; optionally plus what its
    children that it already waited for used."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return 0.0
    fields = text.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime + (cutime + cstime if with_reaped_children else 0)) / _clock_ticks()


@dataclass
class CpuShare:
    """Where the machine's CPU time went over an interval."""

    wall_s: float
    ours_s: float  # this process + the processes it started (and children they reaped)
    others_s: float  # every other process on the machine, and time stolen by the hypervisor
    cpus: int

    @property
    def others_fraction(self) -> float:
        """Of the machine's capacity over the interval (wall x CPUs)."""
        capacity = self.wall_s * self.cpus
        return self.others_s / capacity if capacity > 0 else 0.0


class CpuMeter:
    """CPU time used by us (this process + `pids()`) vs everyone else, between start and stop.

    A process started mid-interval counts from zero; one stopped mid-interval is counted
    through this process's reaped-children time, so neither shows up as someone else's."""

    def __init__(self, pids: Callable[[], list[int]] = list) -> None:
        self.pids = pids  # our processes running now
        self._start: tuple[float, float, dict[int, float]] | None = None

    def _ours(self) -> dict[int, float]:
        me = os.getpid()
        out = {me: process_cpu_seconds(me, with_reaped_children=True)}
        out.update({p: process_cpu_seconds(p) for p in self.pids() if p != me})
        return out

    def start(self) -> None:
        self._start = (time.perf_counter(), machine_busy_seconds(), self._ours())

    def stop(self) -> CpuShare:
        assert self._start is not None, "stop() before start()"
        t0, busy0, ours0 = self._start
        ours1 = self._ours()
        me = os.getpid()
        # A child alive at the start and reaped since moved into our own reaped-children time.
        ours = sum(v - ours0.get(p, 0.0) for p, v in ours1.items() if p == me or p in ours0)
        ours += sum(v for p, v in ours1.items() if p not in ours0)  # started since
        ours -= sum(v for p, v in ours0.items() if p not in ours1 and p != me)  # reaped since
        wall = time.perf_counter() - t0
        others = max(0.0, machine_busy_seconds() - busy0 - ours)
        return CpuShare(wall, ours, others, os.cpu_count() or 1)


def wait_for_quiet(
    pids: Callable[[], list[int]], timeout_s: float, threshold: float, window_s: float = 1.0
) -> tuple[float, float]:
    """Until other processes (not this one, not `pids()`) take under `threshold` of the
    machine for two windows in a row, or `timeout_s` passes: (seconds waited, last share)."""
    start = time.perf_counter()
    calm, share = 0, 0.0
    while calm < 2:
        meter = CpuMeter(pids)
        meter.start()
        time.sleep(window_s)
        share = meter.stop().others_fraction
        calm = calm + 1 if share < threshold else 0
        if time.perf_counter() - start >= timeout_s:
            break
    return time.perf_counter() - start, share


# ---- pinning -----------------------------------------------------------------------------------
def cores_for(replicas: int, available: Sequence[int]) -> list[int]:
    """Replica i's core: the i-th usable CPU (wrapping when there are fewer CPUs than replicas)."""
    cpus = sorted(available)
    if not cpus:
        raise ValueError("no CPU to pin to")
    return [cpus[i % len(cpus)] for i in range(replicas)]


def pin_process(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` (sched_setaffinity on a pid moves only its main thread); threads
    started later inherit their creator's mask, which is pinned by then too."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setaffinity(int(tid), cpus)


def affinity(pid: int) -> list[int]:
    return sorted(os.sched_getaffinity(pid))
