"""Building the C++ kernels under model/csrc on first use, once per process.

Each kernel is compiled with torch's cpp_extension the first time it is asked for and cached
under ~/.cache/torch_extensions (keyed by source and flags, and by the CPU's features through
its name: `tagged`), so later processes only load it.
If the compiler or headers are missing the failure is logged once and the caller falls back to
a torch path that computes the same thing.

torch guards a build folder with a plain `lock` file that it deletes when done: a process killed
while holding it (an OOM kill during the first build, a SIGKILLed worker, a cancelled CI run)
leaves the file behind and every later process waits on it forever. So builds here are
serialised by an flock, which the kernel drops when its holder dies; whoever holds the flock
knows that a `lock` file it finds is stale and removes it. Waiting for another live builder is
bounded too (BUILD_WAIT_S): past it, the torch path.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import threading
import time

log = logging.getLogger("splitserve")
CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
_lock = threading.Lock()
_built: dict[str, object] = {}  # name -> module, or None when the build failed
BUILD_WAIT_S = 600.0  # a cold build takes about a minute on 2 busy cores


@functools.cache
def cpu_tag() -> str:
    """A short hash of this CPU's feature flags. The kernels are built with -march=native, and
    torch keys its cache only on source and flags: a build cached on a machine with AVX-512 or
    AMX, loaded from a shared home or volume on one without, would die of SIGILL. Each CPU
    kind gets its own build instead."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return hashlib.sha1(" ".join(sorted(flags.split())).encode()).hexdigest()[:10]


def tagged(name: str) -> str:
    """The extension's name as built and cached on this CPU."""
    return f"{name}_{cpu_tag()}"


@contextlib.contextmanager
def _exclusive(path: str, timeout_s: float):
    """An flock on `path`, waited for at most timeout_s (TimeoutError past it)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"another process held {path} for {timeout_s:.0f} s"
                    ) from None
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)  # drops the flock


def _load(name: str, source: str, cflags: list[str]):
    from torch.utils.cpp_extension import _get_build_directory, load

    name = tagged(name)
    folder = _get_build_directory(name, verbose=False)
    with _exclusive(os.path.join(folder, "splitserve.flock"), BUILD_WAIT_S):
        stale = os.path.join(folder, "lock")  # torch's; nobody alive holds it while we hold ours
        if os.path.exists(stale):
            log.warning("removing %s, left by a build that died half-way", stale)
            with contextlib.suppress(FileNotFoundError):
                os.remove(stale)
        return load(
            name,
            [os.path.join(CSRC, source)],
            extra_cflags=cflags,
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )


def build(name: str, source: str, cflags: list[str], what: str):
    """The compiled module `name` from csrc/`source`, or None if it can't be built here."""
    with _lock:
        if name not in _built:
            try:
                _built[name] = _load(name, source, cflags)
            except Exception as exc:  # no compiler, no headers, ...: fall back, say so once
                _built[name] = None
                log.warning(
                    "%s unavailable (%s); using torch instead",
                    what,
                    " ".join(str(exc).split())[:200],
                )
        return _built[name]
