"""Where the CPU time went and where processes run (bench/cpus.py): real /proc readings, real
processes pinned and waited for; no timing is asserted beyond generous bounds."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from splitserve.bench import cpus


def test_cpu_accounting():
    share = cpus.CpuShare(wall_s=2.0, ours_s=1.0, others_s=1.0, cpus=2)
    assert share.others_fraction == 0.25
    assert cpus.CpuShare(0.0, 0.0, 0.0, 2).others_fraction == 0.0
    assert cpus.process_cpu_seconds(os.getpid()) > 0
    assert cpus.process_cpu_seconds(2**22 + 1) == 0.0  # above pid_max: never a process
    meter = cpus.CpuMeter()
    meter.start()
    sum(i * i for i in range(200_000))
    got = meter.stop()
    assert got.ours_s >= 0 and got.others_s >= 0 and got.wall_s > 0


def test_cores_are_one_per_replica_and_wrap_when_short():
    assert cpus.cores_for(2, {3, 1}) == [1, 3]
    assert cpus.cores_for(1, {0, 1}) == [0]
    assert cpus.cores_for(3, [0, 1]) == [0, 1, 0]
    with pytest.raises(ValueError):
        cpus.cores_for(1, [])


THREADS = (  # a process with three threads besides its main one
    "import threading, time\n"
    "for _ in range(3):\n"
    "    threading.Thread(target=time.sleep, args=(30,)).start()\n"
    "time.sleep(30)\n"
)


def test_pinning_moves_every_thread():
    proc = subprocess.Popen([sys.executable, "-c", THREADS])
    try:
        cpu = max(os.sched_getaffinity(0))  # not the first: the default mask would pass too
        for _ in range(200):  # until its threads exist
            if len(os.listdir(f"/proc/{proc.pid}/task")) >= 4:
                break
            time.sleep(0.05)
        cpus.pin_process(proc.pid, {cpu})
        tids = os.listdir(f"/proc/{proc.pid}/task")
        assert len(tids) >= 4
        assert all(os.sched_getaffinity(int(t)) == {cpu} for t in tids)
    finally:
        proc.kill()
        proc.wait()


def test_waiting_for_quiet_is_bounded():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # someone else
    try:
        waited, share = cpus.wait_for_quiet(list, timeout_s=0.5, threshold=0.0, window_s=0.2)
        assert 0.4 <= waited < 3.0 and share > 0  # never quiet by that bar: gives up in time
    finally:
        busy.kill()
        busy.wait()
    waited, _ = cpus.wait_for_quiet(list, timeout_s=5.0, threshold=1.01, window_s=0.1)
    assert waited < 1.0  # always quiet by that bar: two windows
