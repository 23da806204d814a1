"""The kernel build survives what killed processes leave behind, and never waits forever."""

from __future__ import annotations

import os
import threading

import pytest
from torch.utils.cpp_extension import _get_build_directory

from splitserve.model import block_linear as bl
from splitserve.model import cpp_ext

NAME = "splitserve_block_linear"


def test_a_lock_left_by_a_dead_build_is_removed(monkeypatch):
    assert bl.load_kernel() is not None  # built (or loaded from the cache) the normal way
    stale = os.path.join(_get_build_directory(cpp_ext.tagged(NAME), verbose=False), "lock")
    with open(stale, "w"):  # what torch leaves when its builder is SIGKILLed mid-build
        pass
    monkeypatch.delitem(cpp_ext._built, NAME)  # forget this process's module: build again
    result: list[object] = []
    worker = threading.Thread(target=lambda: result.append(bl.load_kernel()), daemon=True)
    worker.start()
    worker.join(120)  # torch alone would wait on the file forever
    assert not worker.is_alive(), "the build waited on a stale lock"
    assert result[0] is not None and result[0].has_avx512() in (True, False)
    assert not os.path.exists(stale)


def test_builds_are_kept_apart_per_cpu_kind():
    # -march=native code cached for one CPU must not be loaded on another (SIGILL)
    tag = cpp_ext.cpu_tag()
    assert len(tag) == 10 and tag == cpp_ext.cpu_tag()
    assert cpp_ext.tagged(NAME) == f"{NAME}_{tag}"
    assert os.path.basename(bl.load_kernel().__file__).startswith(cpp_ext.tagged(NAME))


def test_waiting_for_a_live_builder_is_bounded(tmp_path):
    path = str(tmp_path / "x.flock")
    # The inner one opens the file again: two flocks conflict as across processes.
    with (
        cpp_ext._exclusive(path, 1.0),
        pytest.raises(TimeoutError, match="held"),
        cpp_ext._exclusive(path, 0.5),
    ):
        pass
    with cpp_ext._exclusive(path, 0.5):  # released with its holder
        pass
