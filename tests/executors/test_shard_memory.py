"""Loading a model shard gives the heap that loading freed back to the OS (release_load_memory)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# 200 MiB in 100 KiB pieces (below glibc's mmap threshold: they come from the heap), all freed
# but the last, which pins the heap's top so that free() can't shrink it by itself.
PROBE = textwrap.dedent(
    """
    from splitserve.executors.shard import release_load_memory

    def rss_mib():
        status = open("/proc/self/status").read()
        return int(status.split("RssAnon:")[1].split()[0]) // 1024

    pieces = [bytearray(100 * 1024) for _ in range(2048)]
    last = pieces[-1]
    del pieces
    held = rss_mib()
    released = release_load_memory()
    print(released, held, rss_mib())
    """
)


def test_freed_heap_goes_back_to_the_os():
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True
    )
    released, held, after = out.stdout.split()
    assert released == "True"  # glibc here: malloc_trim exists
    assert int(held) - int(after) > 150, (held, after)
