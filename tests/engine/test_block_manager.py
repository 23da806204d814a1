"""Block manager bookkeeping: allocation, prefix cache, eviction order, no leaks."""

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.engine.block_manager import BlockManager
from splitserve.engine.hashing import block_hashes, hash_block, kv_namespace


@dataclass
class Seq:
    tokens: list[int]
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_registered_blocks: int = 0


def run_prefill(bm: BlockManager, seq: Seq, bs: int = 4) -> bool:
    hashes = block_hashes(seq.tokens, bs)
    cached = bm.find_cached_prefix(hashes, len(seq.tokens))
    n = len(seq.tokens) - len(cached) * bs
    if not bm.allocate_slots(seq, n, cached):
        return False
    seq.num_computed_tokens += n
    bm.register_full_blocks(seq, hashes)
    return True


def test_allocate_and_free_returns_every_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = Seq(list(range(10)))
    assert run_prefill(bm, seq)
    assert len(seq.block_table) == 3
    assert bm.num_free_blocks == 5
    assert bm.num_used_slots == 10
    bm.free(seq)
    assert bm.num_free_blocks == 8 and bm.num_used_slots == 0
    bm.check_integrity()


def test_refuses_when_pool_is_full_and_changes_nothing():
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = Seq(list(range(12)))
    assert not run_prefill(bm, seq)
    assert seq.block_table == [] and bm.num_free_blocks == 2
    bm.check_integrity()


def test_prefix_hit_shares_blocks_and_leaves_one_token_to_compute():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = Seq(list(range(12)))
    assert run_prefill(bm, a)
    b = Seq(list(range(12)))  # identical prompt: last block must be recomputed
    hashes = block_hashes(b.tokens, 4)
    cached = bm.find_cached_prefix(hashes, len(b.tokens))
    assert cached == a.block_table[:2]
    assert bm.allocate_slots(b, 4, cached)
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2]
    assert bm.blocks[a.block_table[0]].ref_count == 2
    assert bm.stats.hit_tokens == 8
    bm.free(a)
    bm.free(b)
    bm.check_integrity()
    assert bm.num_free_blocks == 16


def test_a_peek_at_the_prefix_cache_counts_nothing_and_changes_nothing():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = Seq(list(range(12)))
    assert run_prefill(bm, a)
    queried, hits = bm.stats.queried_tokens, bm.stats.hit_tokens
    hashes = block_hashes(a.tokens, 4)
    # The whole chain, last block included (an admission always leaves one token to compute).
    assert bm.cached_prefix_blocks(hashes) == a.block_table
    assert bm.cached_prefix_blocks(block_hashes([99, *a.tokens[1:]], 4)) == []
    assert (bm.stats.queried_tokens, bm.stats.hit_tokens) == (queried, hits)
    assert [bm.blocks[b].ref_count for b in a.block_table] == [1, 1, 1]
    off = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=False)
    assert off.cached_prefix_blocks(hashes) == []
    bm.check_integrity()


def test_freed_blocks_stay_cached_until_reused_lru():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = Seq([*list(range(8)), 99])
    assert run_prefill(bm, a)
    a_table = list(a.block_table)
    bm.free(a)
    assert bm.num_cached_blocks == 2
    # a revisit hits both full blocks even though nobody owns them
    again = Seq([*list(range(8)), 98])
    assert len(bm.find_cached_prefix(block_hashes(again.tokens, 4), 9)) == 2
    # an unrelated sequence takes the blocks without a hash first, then evicts cached ones,
    # the prefix's tail before its head
    other = Seq([50] * 9)
    assert run_prefill(bm, other)
    assert bm.find_cached_prefix(block_hashes(again.tokens, 4), 9) == [a_table[0]]
    bm.free(other)
    bm.check_integrity()


def test_salt_and_namespace_change_every_key():
    toks = list(range(8))
    plain = block_hashes(toks, 4)
    salted = block_hashes(toks, 4, salt="tenant-a")
    other_model = block_hashes(toks, 4, namespace=kv_namespace("other", "float32", 4))
    assert len(plain) == 2
    assert not set(plain) & set(salted)
    assert not set(plain) & set(other_model)
    # the chain: the second block depends on the first
    assert plain[1] == hash_block(plain[0], toks[4:8])
    assert block_hashes([9, 9, 9, 9, *toks[4:8]], 4)[1] != plain[1]


def test_incremental_hashes_equal_full_recompute():
    toks = list(range(21))
    first = block_hashes(toks[:9], 4, salt="s")
    rest = block_hashes(toks, 4, salt="s", start=len(first), parent=first[-1])
    assert first + rest == block_hashes(toks, 4, salt="s")


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["add", "grow", "free"]), st.integers(0, 7), st.integers(1, 20)),
        max_size=60,
    )
)
def test_random_interleavings_never_leak(ops):
    bm = BlockManager(num_blocks=12, block_size=4)
    live: dict[int, Seq] = {}
    for op, key, n in ops:
        if op == "add" and key not in live:
            seq = Seq([key % 3] * n)  # shared prefixes across keys
            if run_prefill(bm, seq):
                live[key] = seq
        elif op == "grow" and key in live:
            seq = live[key]
            if bm.allocate_slots(seq, 1):
                seq.tokens.append(n)
                seq.num_computed_tokens += 1
                bm.register_full_blocks(seq, block_hashes(seq.tokens, 4))
        elif op == "free" and key in live:
            bm.free(live.pop(key))
        bm.check_integrity()
        assert bm.num_free_blocks + len({b for s in live.values() for b in s.block_table}) == 12
    for seq in live.values():
        bm.free(seq)
    bm.check_integrity()
    assert bm.num_free_blocks == 12 and bm.num_used_slots == 0


def test_rejects_empty_pool():
    with pytest.raises(ValueError):
        BlockManager(num_blocks=0, block_size=4)
