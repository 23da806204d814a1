"""Paged KV bookkeeping: block ownership, reference counts and the prefix cache. No tensors.

Invariants (checked by `check_integrity`):

| state              | ref_count | in free queue | in hash map           |
|--------------------|-----------|---------------|-----------------------|
| owned              | >= 1      | no            | if full and hashed    |
| free, cached       | 0         | yes (LRU end) | yes                   |
| free, empty        | 0         | yes (front)   | no                    |

Free blocks double as the prefix cache: a freed block keeps its hash and stays findable until
it is taken for new tokens. The free queue is the eviction order: blocks without a hash are
handed out first, then cached blocks least recently freed first. A sequence's blocks are freed
tail first, so a shared prefix outlives the suffixes that hang off it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from splitserve.engine.hashing import BlockHash


class HasBlocks(Protocol):
    """What the block manager needs of a sequence."""

    block_table: list[int]
    num_computed_tokens: int
    num_registered_blocks: int  # how many leading blocks are already in the hash map


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None
    num_filled: int = 0  # token slots written (or scheduled to be written)


@dataclass
class PrefixCacheStats:
    queried_tokens: int = 0
    hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


@dataclass
class BlockManager:
    num_blocks: int
    block_size: int
    enable_prefix_caching: bool = True
    blocks: list[Block] = field(init=False)
    stats: PrefixCacheStats = field(default_factory=PrefixCacheStats)

    def __post_init__(self) -> None:
        if self.num_blocks < 1:
            raise ValueError("the KV pool needs at least one block")
        self.blocks = [Block(i) for i in range(self.num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(self.num_blocks))
        self._cached: dict[BlockHash, int] = {}
        self.num_used_slots = 0

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks owned by some sequence."""
        return self.num_used_blocks / self.num_blocks

    @property
    def slot_usage(self) -> float:
        """Fraction of all token slots holding (or about to hold) a live token."""
        return self.num_used_slots / (self.num_blocks * self.block_size)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache --------------------------------------------------------------------
    def cached_prefix_blocks(self, hashes: Sequence[BlockHash]) -> list[int]:
        """Blocks holding the longest cached prefix of the chain `hashes`. Read-only: it counts
        nothing in `stats` (a peek, not an admission's query)."""
        hit: list[int] = []
        if self.enable_prefix_caching:
            for h in hashes:
                block_id = self._cached.get(h)
                if block_id is None:
                    break
                hit.append(block_id)
        return hit

    def find_cached_prefix(self, hashes: Sequence[BlockHash], num_tokens: int) -> list[int]:
        """Blocks holding the longest cached prefix of a `num_tokens`-token sequence; the query
        and its hits are counted in `stats`.

        At least one token is always left to compute, since the step that computes it is the
        one that yields the next token's logits.
        """
        hit = self.cached_prefix_blocks(hashes[: (num_tokens - 1) // self.block_size])
        self.stats.queried_tokens += num_tokens
        self.stats.hit_tokens += len(hit) * self.block_size
        return hit

    def register_full_blocks(self, seq: HasBlocks, hashes: Sequence[BlockHash]) -> None:
        """Make the sequence's computed full blocks findable by their hashes."""
        if not self.enable_prefix_caching:
            return
        num_full = min(len(hashes), seq.num_computed_tokens // self.block_size)
        for i in range(seq.num_registered_blocks, num_full):
            block = self.blocks[seq.block_table[i]]
            if block.block_hash is None and hashes[i] not in self._cached:
                block.block_hash = hashes[i]
                self._cached[hashes[i]] = block.block_id
        seq.num_registered_blocks = max(seq.num_registered_blocks, num_full)

    # ---- allocation ----------------------------------------------------------------------
    def can_allocate(self, seq: HasBlocks, num_new_tokens: int, cached: Sequence[int] = ()) -> bool:
        num_tokens = seq.num_computed_tokens + len(cached) * self.block_size + num_new_tokens
        num_new_blocks = self.blocks_needed(num_tokens) - len(seq.block_table) - len(cached)
        num_revived = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        return max(num_new_blocks, 0) + num_revived <= len(self._free)

    def allocate_slots(
        self, seq: HasBlocks, num_new_tokens: int, cached: Sequence[int] = ()
    ) -> bool:
        """Give `seq` slots for `num_new_tokens` more tokens, after adopting `cached` blocks.

        Returns False and changes nothing when the pool can't hold them. On success the cached
        blocks are appended to the block table and counted as computed.
        """
        if not self.can_allocate(seq, num_new_tokens, cached):
            return False
        for block_id in cached:
            self._take_ref(block_id)
            seq.block_table.append(block_id)
        seq.num_computed_tokens += len(cached) * self.block_size
        seq.num_registered_blocks = max(seq.num_registered_blocks, len(cached))
        start = seq.num_computed_tokens
        end = start + num_new_tokens
        while len(seq.block_table) < self.blocks_needed(end):
            seq.block_table.append(self._pop_free())
        self._fill(seq.block_table, start, end)
        return True

    def free(self, seq: HasBlocks) -> None:
        """Return every block of `seq`; tail first, so shared prefixes are evicted last."""
        for block_id in reversed(seq.block_table):
            self._drop_ref(block_id)
        seq.block_table.clear()
        seq.num_registered_blocks = 0

    def reset_prefix_cache(self) -> None:
        for block_hash, block_id in list(self._cached.items()):
            if self.blocks[block_id].ref_count == 0:
                self.blocks[block_id].block_hash = None
                del self._cached[block_hash]
                self._free.move_to_end(block_id, last=False)

    # ---- internals -----------------------------------------------------------------------
    def _fill(self, table: list[int], start: int, end: int) -> None:
        bs = self.block_size
        for idx in range(start // bs, self.blocks_needed(end)):
            block = self.blocks[table[idx]]
            lo, hi = max(start, idx * bs), min(end, (idx + 1) * bs)
            new_filled = max(block.num_filled, hi - idx * bs)
            self.num_used_slots += new_filled - block.num_filled
            block.num_filled = new_filled
            assert lo <= hi

    def _pop_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:  # evict it from the prefix cache
            del self._cached[block.block_hash]
            block.block_hash = None
        block.ref_count = 1
        block.num_filled = 0
        return block_id

    def _take_ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
            self.num_used_slots += block.num_filled
        block.ref_count += 1

    def _drop_ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.num_used_slots -= block.num_filled
            self._free[block_id] = None
            if block.block_hash is None:
                block.num_filled = 0
                self._free.move_to_end(block_id, last=False)

    def check_integrity(self) -> None:
        """Raise AssertionError if the table in the module docstring doesn't hold."""
        used_slots = 0
        for block in self.blocks:
            in_free = block.block_id in self._free
            assert block.ref_count >= 0, block
            assert in_free == (block.ref_count == 0), block
            if block.block_hash is not None:
                assert self._cached.get(block.block_hash) == block.block_id, block
            if block.ref_count > 0:
                used_slots += block.num_filled
        assert all(self.blocks[b].block_hash == h for h, b in self._cached.items())
        assert used_slots == self.num_used_slots, (used_slots, self.num_used_slots)
