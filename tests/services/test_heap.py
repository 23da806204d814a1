"""services/heap: the arena cap a worker sets at start, and the environment's say over it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from splitserve.services import heap

# Eight threads, all alive at once, each mallocs; glibc's malloc_info lists one <heap> per arena.
PROBE = textwrap.dedent(
    """
    import ctypes, sys, threading
    from splitserve.services import heap

    tuned = heap.tune() if sys.argv[1] == "tune" else None
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.open_memstream.restype = ctypes.c_void_p
    barrier = threading.Barrier(9)

    def work():
        libc.malloc(4096)
        barrier.wait()  # every thread has its arena now
        barrier.wait()  # counted

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    barrier.wait()
    buf, size = ctypes.c_char_p(), ctypes.c_size_t()
    stream = ctypes.c_void_p(libc.open_memstream(ctypes.byref(buf), ctypes.byref(size)))
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    barrier.wait()
    for t in threads:
        t.join()
    print(tuned, ctypes.string_at(buf, size.value).decode().count("<heap nr="))
    """
)


def arenas(mode: str, **env: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        capture_output=True, text=True, timeout=60, check=True,
        env={"PATH": "/usr/bin:/bin", **env},
    )  # fmt: skip
    tuned, count = out.stdout.split()
    return tuned, int(count)


def test_tune_caps_the_arenas_of_a_threaded_process():
    assert arenas("tune") == ("True", heap.MAX_ARENAS)
    _, untuned = arenas("plain")
    assert untuned > heap.MAX_ARENAS  # what the cap saves: glibc's default is 8 per core


def test_the_environment_wins():
    assert arenas("tune", MALLOC_ARENA_MAX="4")[0] == "False"
    assert heap.tune({"GLIBC_TUNABLES": "glibc.malloc.arena_max=3"}) is False


@pytest.mark.parametrize("cap", ["1", "3"])
def test_an_operators_cap_is_what_applies(cap):
    assert arenas("plain", MALLOC_ARENA_MAX=cap)[1] == int(cap)
