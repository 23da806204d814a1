"""Building the C++ kernels under model/csrc on first use, once per process.

Each kernel is compiled with torch's cpp_extension the first time it is asked for and cached
under ~/.cache/torch_extensions (keyed by source and flags), so later processes only load it.
If the compiler or headers are missing the failure is logged once and the caller falls back to
a torch path that computes the same thing.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger("splitserve")
CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
_lock = threading.Lock()
_built: dict[str, object] = {}  # name -> module, or None when the build failed


def build(name: str, source: str, cflags: list[str], what: str):
    """The compiled module `name` from csrc/`source`, or None if it can't be built here."""
    with _lock:
        if name not in _built:
            try:
                from torch.utils.cpp_extension import load

                _built[name] = load(
                    name,
                    [os.path.join(CSRC, source)],
                    extra_cflags=cflags,
                    extra_ldflags=["-fopenmp"],
                    verbose=False,
                )
            except Exception as exc:  # no compiler, no headers, ...: fall back, say so once
                _built[name] = None
                log.warning(
                    "%s unavailable (%s); using torch instead",
                    what,
                    " ".join(str(exc).split())[:200],
                )
        return _built[name]
