"""A benchmark's phases: a progress bar over them, and what each one cost and met.

    phases = Phases(total, "bench mesh")
    with phases("colocated mesh: workload"):
        ...
    phases.seconds, phases.loadavg, phases.cpu     # per phase name

A phase that must end outside the block that began it (a mesh stopping as its `with` exits)
uses `begin(name)` and `done(name)`. `pids` names the processes the benchmark started (a running
mesh's), so their CPU time counts as ours, not as another process's.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

from splitserve.bench.cpus import CpuMeter, CpuShare


class Phases:
    """A progress bar over the benchmark's phases; remembers how long each took, the load
    average when it started, and how much CPU time other processes took during it."""

    def __init__(self, total: int, desc: str, enabled: bool = True) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="phase", leave=False, disable=not enabled)
        self.seconds: dict[str, float] = {}
        self.loadavg: dict[str, float] = {}
        self.cpu: dict[str, CpuShare] = {}
        self.pids: Callable[[], list[int]] = list
        self._open: dict[str, tuple[float, CpuMeter | None]] = {}

    def to_json(self) -> dict[str, Any]:
        """Per phase: seconds, the 1-minute load average at its start, CPU shares."""
        return {
            "phase_seconds": self.seconds,
            "phase_loadavg_1m": self.loadavg,
            "phase_cpu": {
                name: {**asdict(c), "others_fraction": c.others_fraction}
                for name, c in self.cpu.items()
            },
        }

    def begin(self, name: str) -> None:
        self.bar.set_postfix_str(name)
        self.loadavg[name] = os.getloadavg()[0]
        meter: CpuMeter | None
        try:
            meter = CpuMeter(lambda: self.pids())
            meter.start()
        except OSError:  # no /proc: not Linux
            meter = None
        self._open[name] = (time.perf_counter(), meter)

    def done(self, name: str) -> None:
        start, meter = self._open.pop(name)
        self.seconds[name] = time.perf_counter() - start
        if meter is not None:
            self.cpu[name] = meter.stop()
        self.bar.update()

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.begin(name)
        yield
        self.done(name)

    def close(self) -> None:
        self.bar.close()
