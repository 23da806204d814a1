"""A prefix computed on one prefill worker is served to another from the kvstore (Redis).

Two prompts share a 1,008-token prefix (63 blocks of 16). Prefill worker A computes the first
one and writes its blocks to the kvstore; worker B, which has never seen the prefix, gets the
second one and must fetch those blocks instead of computing them: its PrefillResponse says so,
its Prometheus metrics say so, and so do the kvstore's Stats. Both first tokens, and the whole
answer for B's prompt through the router (prefill -> KV transfer -> decode), must be the
in-process engine's.
"""

from __future__ import annotations

import time

import pytest
from mesh_fixtures import RPC_TIMEOUT_S, RunningMesh, assert_idle, greedy, stream_ids

from splitserve.engine.engine import LLMEngine
from splitserve.engine.tokenizer import Tokenizer
from splitserve.router.auth import tenant_of
from splitserve.v1 import pb, rpc

pytestmark = pytest.mark.slow

BLOCK = 16
SHARED_BLOCKS = 63
SHARED_TOKENS = SHARED_BLOCKS * BLOCK  # 1,008
MAX_TOKENS = 16
GREEDY = pb.SamplingOptions(max_tokens=MAX_TOKENS, temperature=0)


@pytest.fixture(scope="module")
def prompts(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    text = " ".join(
        f"Fact {i}: a shelf of row {i} holds {i * 13 % 97} old books." for i in range(90)
    )
    shared = tokenizer.encode(text)[:SHARED_TOKENS]
    assert len(shared) == SHARED_TOKENS
    a = shared + tokenizer.encode(" Question: how many books are on shelf 5?", False)
    b = shared + tokenizer.encode(" Question: which row has the most books, and why?", False)
    return a, b


@pytest.fixture(scope="module")
def expected(reference_engine: LLMEngine, prompts) -> tuple[list[int], list[int]]:
    a, b = greedy(reference_engine, prompts, MAX_TOKENS)
    return a, b


def prefill(mesh: RunningMesh, worker: str, prompt: list[int]) -> pb.PrefillResponse:
    """Prefill directly on one worker, then give the KV lease back (no decode will pull it).

    Under the cache salt the router gives the mesh's API key: the router's request later in
    this module is that tenant's, and only its own tenant's blocks can be a hit for it."""
    stub = rpc.PrefillStub(mesh.channel(worker))
    req = pb.PrefillRequest(
        request_id=f"prefix-{worker}",
        prompt_token_ids=prompt,
        sampling=GREEDY,
        cache_salt=tenant_of(mesh.api_key) if mesh.api_key else "",
    )
    resp = stub.Prefill(req, timeout=RPC_TIMEOUT_S)
    assert resp.kv.lease_id and resp.kv.num_tokens == len(prompt)
    assert stub.ReleaseKV(pb.ReleaseKVRequest(lease_id=resp.kv.lease_id), timeout=10).released
    return resp


def wait_for_puts(mesh: RunningMesh, at_least: int, timeout_s: float = 60.0) -> pb.StatsResponse:
    """Write-back to the kvstore happens in the background, after Prefill has answered."""
    deadline = time.monotonic() + timeout_s
    while (stats := mesh.kvstore_stats()).puts < at_least:
        assert time.monotonic() < deadline, f"kvstore holds only {stats.puts} puts: {stats}"
        time.sleep(0.1)
    return stats


def prompt_token_metrics(mesh: RunningMesh, worker: str) -> dict[str, float]:
    return {
        "fetched_blocks": mesh.worker_metric(worker, "kvstore_blocks_fetched_total"),
        "computed": mesh.worker_metric(worker, "prompt_tokens_total", source="computed"),
        "cached": mesh.worker_metric(worker, "prompt_tokens_total", source="cached"),
    }


def test_worker_b_fetches_the_prefix_worker_a_computed(disagg_mesh, prompts, expected):
    mesh = disagg_mesh
    worker_a, worker_b = mesh.workers_of("prefill")
    prompt_a, prompt_b = prompts
    stats0 = mesh.kvstore_stats()
    assert stats0.backend == "redis"

    # A computes everything: neither its own cache nor the store has any of it.
    a = prefill(mesh, worker_a, prompt_a)
    assert a.num_cached_tokens == 0 and a.num_fetched_tokens == 0
    assert a.first_token_id == expected[0][0]
    full_blocks = len(prompt_a) // BLOCK
    stats1 = wait_for_puts(mesh, stats0.puts + full_blocks)
    assert stats1.num_blocks >= stats0.num_blocks + full_blocks

    # B has never seen the prefix: it fetches every shared block from the store.
    before = prompt_token_metrics(mesh, worker_b)
    b = prefill(mesh, worker_b, prompt_b)
    after = prompt_token_metrics(mesh, worker_b)
    assert b.num_fetched_tokens >= 960, b
    assert b.num_fetched_tokens == SHARED_TOKENS and b.num_cached_tokens == SHARED_TOKENS
    assert b.first_token_id == expected[1][0]
    fetched_blocks = after["fetched_blocks"] - before["fetched_blocks"]
    computed = after["computed"] - before["computed"]
    cached = after["cached"] - before["cached"]
    assert fetched_blocks == SHARED_BLOCKS
    assert computed == len(prompt_b) - SHARED_TOKENS  # only the suffix: 1,008 tokens fewer
    assert computed < len(prompt_b) / 10 and cached == SHARED_TOKENS

    stats2 = mesh.kvstore_stats()
    assert stats2.hits - stats1.hits >= SHARED_BLOCKS  # B's Get found every block it asked for
    assert stats2.puts > stats0.puts


def test_the_router_answers_the_shared_prompt_like_the_engine(disagg_mesh, prompts, expected):
    """B's prompt through the router, disaggregated: prefill (with its cached prefix) ->
    KV transfer -> decode, token for token the engine's answer."""
    prompt_b = prompts[1]
    req = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=prompt_b), sampling=GREEDY, disaggregate=True
    )
    ids, _, usage, _ = stream_ids(disagg_mesh.inference().Generate(req, timeout=RPC_TIMEOUT_S))
    assert ids == expected[1]
    # Both prefill workers now hold the prefix: whichever the router chose had it cached.
    assert usage.prompt_tokens == len(prompt_b)
    assert usage.cached_prompt_tokens >= SHARED_TOKENS


def test_the_mesh_is_idle_afterwards(disagg_mesh):
    assert_idle(disagg_mesh)
