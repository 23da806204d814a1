"""The router's guess of which prompt blocks a worker has cached: an LRU set of block hashes.

Block hashes form a chain (each covers its parent), so a worker holding block i of a prompt
most likely holds blocks 0..i-1 too, and the cached prefix is the leading run of hashes found.
The guess is approximate on purpose: the worker evicts on its own schedule and the router
never asks; a stale hit costs one slower prefill, never a wrong token.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from splitserve.engine.hashing import BlockHash

DEFAULT_CAPACITY_BLOCKS = 65_536  # ~1M tokens at 16 per block, ~4 MiB of hashes per worker


class PrefixIndex:
    def __init__(self, capacity: int = DEFAULT_CAPACITY_BLOCKS) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._lru: OrderedDict[BlockHash, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._lru)

    def match(self, hashes: Sequence[BlockHash]) -> int:
        """Number of leading blocks of `hashes` this worker was recently sent."""
        n = 0
        for h in hashes:
            if h not in self._lru:
                break
            n += 1
        return n

    def insert(self, hashes: Sequence[BlockHash]) -> None:
        """Record that the worker now holds these blocks (most recent last)."""
        for h in hashes:
            self._lru[h] = None
            self._lru.move_to_end(h)
        while len(self._lru) > self.capacity:
            self._lru.popitem(last=False)

    def clear(self) -> None:
        self._lru.clear()
