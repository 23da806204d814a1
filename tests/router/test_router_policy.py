"""Routing policies on bookkeeping-only workers (no channels): round robin cycles, least tokens
picks the lightest, prefix-aware prefers overlap within its thresholds, ties are random, and
100 same-prefix requests don't herd onto one worker."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from splitserve.engine.hashing import block_hashes, kv_namespace
from splitserve.router.policy import (
    LeastOutstandingTokens,
    PrefixAware,
    RoundRobin,
    RoutingJob,
    make_policy,
)
from splitserve.router.prefix_index import PrefixIndex
from splitserve.router.registry import DECODE, LoadTicket, Worker

BLOCK = 16
NAMESPACE = kv_namespace("m", "float32", BLOCK)


def workers(n: int) -> list[Worker]:
    return [Worker(f"10.0.0.{i}:5000", DECODE) for i in range(n)]


def job(tokens: list[int], salt: str | None = None) -> RoutingJob:
    return RoutingJob(block_hashes(tokens, BLOCK, NAMESPACE, salt), len(tokens), BLOCK)


PROMPT = list(range(1024))  # 64 full blocks


def test_round_robin_cycles_and_survives_a_worker_leaving() -> None:
    pool = workers(3)
    rr = RoundRobin()
    picks = [rr.select(pool, job(PROMPT)).address for _ in range(6)]
    assert picks[:3] == sorted(w.address for w in pool) and picks[3:] == picks[:3]
    assert {rr.select(pool[:2], job(PROMPT)) for _ in range(4)} == set(pool[:2])


def test_least_tokens_picks_the_lightest() -> None:
    pool = workers(3)
    pool[0].load.tokens, pool[1].load.tokens, pool[2].load.tokens = 500, 20, 300
    assert LeastOutstandingTokens().select(pool, job(PROMPT)) is pool[1]


def test_ties_are_broken_at_random() -> None:
    pool = workers(4)
    for policy in (LeastOutstandingTokens(random.Random(1)), PrefixAware(rng=random.Random(2))):
        picks = Counter(policy.select(pool, job(PROMPT)).address for _ in range(200))
        assert len(picks) == 4 and min(picks.values()) > 20, picks


def test_prefix_aware_prefers_the_worker_holding_the_prefix() -> None:
    pool = workers(3)
    pool[2].prefixes.insert(job(PROMPT).block_hashes)
    pool[2].load.tokens = 300  # busier, but 1024 cached tokens outweigh it
    policy = PrefixAware(abs_threshold=2048, rel_threshold=1.5)
    assert all(policy.select(pool, job([*PROMPT, 7, 8, 9])) is pool[2] for _ in range(20))


def test_prefix_aware_falls_back_to_least_load_when_imbalanced() -> None:
    pool = workers(3)
    pool[0].prefixes.insert(job(PROMPT).block_hashes)
    pool[0].load.tokens, pool[1].load.tokens, pool[2].load.tokens = 900, 100, 50
    # Cache-wise pool[0] wins (0 + 900 < 1024 + 50), but 900 > 50 + 256 and > 2 x 50.
    assert PrefixAware(abs_threshold=256, rel_threshold=2.0).select(pool, job(PROMPT)) is pool[2]
    # Under the absolute threshold the cache still wins, whatever the ratio.
    assert PrefixAware(abs_threshold=1000, rel_threshold=2.0).select(pool, job(PROMPT)) is pool[0]
    # ... and under the relative one, whatever the difference.
    assert PrefixAware(abs_threshold=0, rel_threshold=20.0).select(pool, job(PROMPT)) is pool[0]


def test_same_prefix_requests_do_not_herd_onto_one_worker() -> None:
    """dynamo#3581: 100 requests share a long prefix that one worker caches; every request
    stays in flight (its load is counted), so the cached worker must stop winning."""
    pool = workers(4)
    policy = PrefixAware(abs_threshold=2048, rel_threshold=1.5, rng=random.Random(0))
    tickets: list[LoadTicket] = []
    for i in range(100):
        request = job([*PROMPT, 5000 + i])
        chosen = policy.select(pool, request)
        chosen.prefixes.insert(request.block_hashes)  # as the dispatcher does
        tickets.append(chosen.track(request.uncached_tokens(chosen) + 256))
    counts = Counter(t.worker.address for t in tickets)
    assert len(counts) == 4 and max(counts.values()) < 50, counts
    for t in tickets:
        t.release()
    assert all(w.load.tokens == 0 and w.load.requests == 0 for w in pool)


def test_cache_salt_separates_tenants() -> None:
    pool = workers(2)
    pool[0].prefixes.insert(job(PROMPT, salt="tenant-a").block_hashes)
    assert job(PROMPT, salt="tenant-a").cached_tokens(pool[0]) == 1024
    assert job(PROMPT, salt="tenant-b").cached_tokens(pool[0]) == 0


def test_load_ticket_counts_once_on_every_exit() -> None:
    (w,) = workers(1)
    with pytest.raises(RuntimeError), w.track(100) as ticket:
        ticket.consume(30)
        assert (w.load.tokens, w.load.requests) == (70, 1)
        raise RuntimeError("the stream broke")
    ticket.release()  # a second release is a no-op
    assert (w.load.tokens, w.load.requests) == (0, 0)


def test_prefix_index_is_a_bounded_lru_of_leading_blocks() -> None:
    index = PrefixIndex(capacity=4)
    a, b = job(list(range(64))).block_hashes, job(list(range(100, 164))).block_hashes
    index.insert(a)
    assert index.match(a) == 4 and index.match(a[1:]) == 3 and index.match(b) == 0
    index.insert(b[:2])  # evicts a's two oldest blocks: the leading run is gone
    assert len(index) == 4 and index.match(a) == 0 and index.match(b) == 2


def test_make_policy_names() -> None:
    assert isinstance(make_policy("least_tokens"), LeastOutstandingTokens)
    assert isinstance(make_policy("round_robin"), RoundRobin)
    assert isinstance(make_policy("prefix_aware"), PrefixAware)
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("fastest")
