"""glibc's allocator, set up for a long-lived worker: what it keeps after a burst goes back.

A worker's resident size grew by ~190 MiB over its idle size under a 16-way load of
1,000-token prompts (SmolLM2, 2 vCPUs) and stayed there afterwards: memory that was freed but
that glibc kept, in the arena of each thread that allocated (the engine's, gRPC's, asyncio's
helpers), each holding its freed pages apart from the others'.

`tune` caps the arenas at MAX_ARENAS; `trim` hands their free pages back (the engine loop calls
it once it has been idle a while). MALLOC_ARENA_MAX or GLIBC_TUNABLES in the environment wins.
Elsewhere (musl, macOS) both do nothing.

Measured and not done: fixing glibc's mmap threshold (it rises, up to 32 MiB, to the size of
the largest mapped block freed so far, after which blocks below it come from the arenas). At
256 KiB it cost a quarter of the throughput under load (every transient tensor mapped and
faulted in anew); at 8 MiB it kept ~80 MiB less after a burst, which the idle trim gets back
anyway, and did not lower the peak (docs/benchmarks.md, "Worker memory").
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping

MAX_ARENAS = 2
_M_ARENA_MAX = -8  # mallopt's parameter, from glibc's malloc.h


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc has both
    except (AttributeError, OSError):
        return None
    return libc


def tune(environ: Mapping[str, str] | None = None) -> bool:
    """Cap the arenas at MAX_ARENAS unless the environment says otherwise; whether it did.
    Call early: threads that already have an arena keep it."""
    env = os.environ if environ is None else environ
    if "MALLOC_ARENA_MAX" in env or "GLIBC_TUNABLES" in env:
        return False
    libc = _libc()
    return libc is not None and libc.mallopt(_M_ARENA_MAX, MAX_ARENAS) == 1


def trim() -> bool:
    """Give the free pages of every arena back to the OS; False where there is no glibc."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
