"""Freed heap goes back to the OS (services/heap.trim, called after a shard loads), and a loaded
checkpoint lets its file pages go."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

# 200 MiB in 100 KiB pieces (below glibc's mmap threshold: they come from the heap), all freed
# but the last, which pins the heap's top so that free() can't shrink it by itself.
PROBE = textwrap.dedent(
    """
    from splitserve.services.heap import trim

    def rss_mib():
        status = open("/proc/self/status").read()
        return int(status.split("RssAnon:")[1].split()[0]) // 1024

    pieces = [bytearray(100 * 1024) for _ in range(2048)]
    last = pieces[-1]
    del pieces
    held = rss_mib()
    released = trim()
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


def _mapped_kib(path: str) -> int:
    """Resident KiB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        lines = f.readlines()
    for line in lines:
        first = line.split()[0]
        if "-" in first and not first.endswith(":"):  # a mapping's header line
            inside = line.rstrip().endswith(path)
        elif inside and first == "Rss:":
            total += int(line.split()[1])
    return total


def test_a_loaded_checkpoint_lets_its_file_pages_go(smollm2_path):
    from splitserve.engine.config import EngineConfig
    from splitserve.executors.build import create_engine
    from splitserve.model.loader import open_checkpoint

    ckpt = open_checkpoint(smollm2_path)
    engine = create_engine(EngineConfig(num_kv_blocks=16), ckpt)  # drops the pages after load
    assert _mapped_kib(smollm2_path) < 1024  # was the whole file (~94 MB) while loading
    # the file is still readable afterwards: the pages come back on a read
    name, before = next(ckpt.tensors({"model.norm.weight"}))
    assert _mapped_kib(smollm2_path) > 0 and before.abs().sum() > 0
    ckpt.drop_file_pages()
    assert _mapped_kib(smollm2_path) < 1024
    assert torch.equal(dict(ckpt.tensors({"model.norm.weight"}))[name], before)
    assert engine.model_config.num_layers == 30
