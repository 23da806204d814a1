"""The engine methods the workers add: reserve-then-complete, and adopting kvstore blocks."""

from __future__ import annotations

import dataclasses

import pytest
from workers_util import prompt, tiny_engine

from splitserve.engine.engine import CapacityError, LLMEngine, RequestError
from splitserve.engine.outputs import KVExport
from splitserve.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def run(engine: LLMEngine, rid: str, p: list[int], params: SamplingParams) -> list[int]:
    engine.add_request(rid, p, params)
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        tokens += [t for o in engine.step() if o.request_id == rid for t in o.new_token_ids]
    return tokens


def export(engine: LLMEngine, p: list[int], params: SamplingParams) -> tuple[int, KVExport]:
    """What a prefill worker does: the first token and the prompt's KV."""
    engine.add_request("export", p, dataclasses.replace(params, max_tokens=1), export_kv=True)
    final = next(o for _ in range(20) for o in engine.step() if o.finished)
    assert final.kv is not None
    return final.new_token_ids[0], final.kv


def assert_idle(engine: LLMEngine) -> None:
    bm = engine.block_manager
    bm.check_integrity()
    assert bm.num_free_blocks == bm.num_blocks and engine.num_reserved_requests == 0


@pytest.mark.parametrize(
    "params",
    [GREEDY, SamplingParams(max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)],
    ids=["greedy", "seeded"],
)
def test_reserve_then_complete_continues_like_one_engine(params):
    engine = tiny_engine()
    p = prompt(13)
    expected = run(engine, "mono", p, params)
    first, kv = export(tiny_engine(), p, params)  # another worker, same weights
    engine.reserve_prefilled("adopt", p, params)
    out = engine.complete_prefilled("adopt", kv, first)
    tokens = list(out.new_token_ids)
    while engine.has_unfinished_requests():
        tokens += [t for o in engine.step() for t in o.new_token_ids]
    assert tokens == expected
    assert_idle(engine)


def test_reservation_errors_return_blocks():
    engine = tiny_engine(num_blocks=8)
    p = prompt(10)
    _, kv = export(tiny_engine(), p, GREEDY)
    engine.reserve_prefilled("r", p, GREEDY)  # 3 of 8 blocks
    with pytest.raises(CapacityError):
        engine.reserve_prefilled("big", prompt(24), GREEDY)  # 6 more
    with pytest.raises(RequestError):
        engine.reserve_prefilled("r", p, GREEDY)  # duplicate id
    with pytest.raises(RequestError):
        engine.complete_prefilled("r", KVExport(kv.data, 9), 5)  # wrong token count
    assert_idle(engine)  # a failed completion released the reservation
    engine.reserve_prefilled("r", p, GREEDY)
    with pytest.raises(ValueError):
        engine.complete_prefilled("r", KVExport(kv.data[:, :, :2], 10), 5)  # wrong shape
    engine.reserve_prefilled("s", p, GREEDY)
    assert engine.cancel_reserved("s") and not engine.cancel_reserved("s")
    assert_idle(engine)


def test_first_token_can_finish_at_once():
    engine = tiny_engine()
    p = prompt(6)
    first, kv = export(tiny_engine(), p, GREEDY)
    engine.reserve_prefilled("one", p, SamplingParams(max_tokens=1, temperature=0))
    out = engine.complete_prefilled("one", kv, first)
    assert out.finished and out.finish_reason == "length" and out.new_token_ids == [first]
    assert_idle(engine)


def test_cached_prefix_blocks_are_hit_and_give_the_same_tokens():
    p = prompt(22)  # 5 full blocks of 4, and 2 tokens more
    source = tiny_engine()
    expected = run(source, "ref", p, GREEDY)
    _, kv = export(source, p, GREEDY)
    engine = tiny_engine()
    hashes = engine.prompt_block_hashes(p, None)
    assert len(hashes) == 5 and engine.num_cached_prefix_blocks(hashes) == 0
    # adopt blocks 0-1, then 2-4 on top of them (the second call needs the first's as parent)
    assert engine.cache_prefix_blocks(hashes[:2], kv.data[:, :, :2]) == 2
    assert engine.cache_prefix_blocks(hashes[:5], kv.data[:, :, 2:5]) == 3
    assert engine.num_cached_prefix_blocks(hashes) == 5
    assert_idle(engine)  # cached blocks are free blocks
    engine.add_request("hit", p, GREEDY)
    tokens, cached = [], 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            tokens += o.new_token_ids
            cached = o.num_cached_tokens
    assert cached == 20 and tokens == expected
    assert_idle(engine)


def test_cache_prefix_blocks_refuses_what_it_cannot_use():
    p = prompt(16)
    _, kv = export(tiny_engine(), p, GREEDY)
    engine = tiny_engine(num_blocks=3)
    hashes = engine.prompt_block_hashes(p, None)
    assert engine.cache_prefix_blocks(hashes[:3], kv.data[:, :, 2:3]) == 0  # parents missing
    assert engine.cache_prefix_blocks(hashes[:4], kv.data[:, :, :4]) == 0  # no room for 4
    salted = engine.prompt_block_hashes(p, "tenant-b")
    assert salted[0] != hashes[0]  # a salt changes the whole chain
    assert_idle(engine)
    disabled = tiny_engine(enable_prefix_caching=False)
    assert disabled.cache_prefix_blocks(hashes[:2], kv.data[:, :, :2]) == 0
