"""Request lifecycle: every ending returns its blocks; bad requests fail alone."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import tiny

from splitserve.engine.config import EngineConfig
from splitserve.engine.engine import LLMEngine, RequestError
from splitserve.engine.outputs import KVExport
from splitserve.engine.sampling_params import SamplingParams, SamplingParamsError
from splitserve.executors.build import create_random_engine

TINY = tiny("model", max_position_embeddings=128)


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return create_random_engine(
        TINY, EngineConfig(num_kv_blocks=24, block_size=4, max_num_batched_tokens=16)
    )


def _drain(engine: LLMEngine, limit: int = 2000) -> None:
    for _ in range(limit):
        if not engine.has_unfinished_requests():
            return
        engine.step()
    raise AssertionError("engine did not drain")


ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("add"), st.integers(1, 40), st.integers(1, 30), st.sampled_from([0.0, 1.0])
        ),
        st.tuples(st.just("abort"), st.integers(0, 30)),
        st.tuples(st.just("step"), st.integers(1, 6)),
    ),
    max_size=40,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops)
def test_random_interleavings_return_every_block(engine, script):
    bm = engine.block_manager
    ids: list[str] = []
    for op in script:
        if op[0] == "add":
            rid = f"r{len(ids)}-{id(script)}"
            prompt = [(i * 7 + len(ids)) % 120 + 3 for i in range(op[1])]
            engine.add_request(
                rid, prompt, SamplingParams(max_tokens=op[2], temperature=op[3], seed=len(ids))
            )
            ids.append(rid)
        elif op[0] == "abort" and ids:
            engine.abort_request(ids[op[1] % len(ids)])
        else:
            for _ in range(op[1]):
                engine.step()
        bm.check_integrity()
    _drain(engine)
    bm.check_integrity()
    assert bm.num_free_blocks == bm.num_blocks
    assert bm.num_used_slots == 0
    assert not engine.scheduler.running and not engine.scheduler.waiting


def test_abort_mid_flight_frees_blocks(engine):
    engine.add_request("a", list(range(3, 30)), SamplingParams(max_tokens=50, temperature=0))
    engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    assert engine.abort_request("a")
    assert not engine.abort_request("a")
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize(
    ("prompt", "params", "error"),
    [
        ([], SamplingParams(), RequestError),
        ([5] * 200, SamplingParams(), RequestError),  # longer than the context
        ([5, 999], SamplingParams(), RequestError),  # token id outside the vocabulary
        ([5], SamplingParams(temperature=-1), SamplingParamsError),
        ([5], SamplingParams(top_p=0), SamplingParamsError),
        ([5], SamplingParams(max_tokens=0), SamplingParamsError),
        ([5], SamplingParams(stop=("x",)), RequestError),  # stop strings need a tokenizer
    ],
)
def test_bad_requests_fail_alone(engine, prompt, params, error):
    engine.add_request("ok", [3, 4, 5], SamplingParams(max_tokens=3, temperature=0))
    with pytest.raises(error):
        engine.add_request("bad", prompt, params)
    _drain(engine)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_duplicate_request_id_is_rejected(engine):
    engine.add_request("dup", [3, 4], SamplingParams(max_tokens=2))
    with pytest.raises(RequestError):
        engine.add_request("dup", [3, 4], SamplingParams(max_tokens=2))
    _drain(engine)


def test_stop_token_ids_and_max_tokens(engine):
    out = engine.generate(
        [[3, 4, 5]], SamplingParams(max_tokens=7, temperature=0, ignore_eos=True)
    )[0]
    assert len(out.new_token_ids) == 7 and out.finish_reason == "length"
    first = out.new_token_ids[2]
    stopped = engine.generate(
        [[3, 4, 5]],
        SamplingParams(max_tokens=7, temperature=0, ignore_eos=True, stop_token_ids=(first,)),
    )[0]
    stop_at = out.new_token_ids.index(first)
    assert stopped.new_token_ids == out.new_token_ids[: stop_at + 1]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == first


def test_seeded_sampling_is_reproducible_whatever_the_batch(engine):
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=1234)
    alone = engine.generate([[3, 4, 5]], params)[0].new_token_ids
    noise = SamplingParams(max_tokens=10, temperature=1.0)
    batch = engine.generate([[9, 9], [3, 4, 5], [7]], [noise, params, noise])
    assert batch[1].new_token_ids == alone


def test_export_then_import_kv_continues_identically(engine):
    prompt = list(range(3, 25))
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    expected = engine.generate([prompt], params)[0].new_token_ids

    engine.add_request(
        "pre", prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True), export_kv=True
    )
    final = next(o for _ in range(20) for o in engine.step() if o.finished)
    assert isinstance(final.kv, KVExport) and final.kv.num_tokens == len(prompt)
    engine.add_prefilled_request("dec", prompt, final.new_token_ids[0], params, final.kv)
    tokens = list(final.new_token_ids)
    while engine.has_unfinished_requests():
        for o in engine.step():
            tokens += o.new_token_ids
    assert tokens == expected
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
