"""Resuming a request from its output so far (what the router does when it migrates a request off
a failed worker): the resumed run must produce exactly the rest of the uninterrupted run, greedy
and seeded, with penalties and min_tokens counting the resumed tokens, alone and batched.
"""

from __future__ import annotations

import pytest
from models import tiny

from splitserve.engine.config import EngineConfig
from splitserve.engine.engine import LLMEngine, RequestError
from splitserve.engine.outputs import RequestOutput
from splitserve.engine.sampling_params import SamplingParams
from splitserve.executors.build import create_random_engine

TINY = tiny("tiny-resume", vocab_size=96, max_position_embeddings=128)
PROMPT = [(i * 11 + 5) % 90 + 3 for i in range(13)]
MAX_TOKENS = 14
CASES = {
    "greedy": SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True),
    "seeded": SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=4242, ignore_eos=True),
    "seeded-penalised": SamplingParams(
        max_tokens=MAX_TOKENS,
        temperature=0.8,
        top_k=20,
        seed=7,
        repetition_penalty=1.3,
        frequency_penalty=0.5,
        presence_penalty=0.3,
        min_tokens=MAX_TOKENS,  # EOS stays masked to the end: resumed tokens must count
    ),
}


def engine(**overrides: int) -> LLMEngine:
    cfg = {"num_kv_blocks": 48, "block_size": 4, "max_num_batched_tokens": 16, **overrides}
    return create_random_engine(TINY, EngineConfig(**cfg))  # fp32, weights from the config's seed


def run(llm: LLMEngine, requests: dict[str, tuple[SamplingParams, list[int]]]) -> dict:
    """Each request id's new tokens, run together to the end."""
    for rid, (params, resume) in requests.items():
        llm.add_request(rid, PROMPT, params, resume_token_ids=resume)
    results = {rid: RequestOutput.empty(rid) for rid in requests}
    while llm.has_unfinished_requests():
        for out in llm.step():
            results[out.request_id].merge(out)
    return results


@pytest.fixture(scope="module")
def llm() -> LLMEngine:
    return engine()


@pytest.fixture(scope="module")
def whole(llm: LLMEngine) -> dict[str, list[int]]:
    outs = run(llm, {name: (params, []) for name, params in CASES.items()})
    got = {name: out.new_token_ids for name, out in outs.items()}
    assert all(len(t) == MAX_TOKENS for t in got.values())
    assert len(set(got["seeded"])) > 3  # actually sampling
    return got


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("k", [0, 1, 2, 5, 13])
def test_a_resumed_request_produces_the_rest_of_the_run(llm, whole, case, k):
    out = run(llm, {"r": (CASES[case], whole[case][:k])})["r"]
    assert out.new_token_ids == whole[case][k:]
    assert out.finished and out.finish_reason == "length"
    assert out.num_output_tokens == MAX_TOKENS and out.num_prompt_tokens == len(PROMPT)
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_resumed_requests_batched_with_others_on_a_fresh_engine(whole):
    """Another engine (another worker), several resumes at once, chunked prefill of
    prompt + output, and a tiny pool: still exactly the rest of each run."""
    llm = engine(num_kv_blocks=20, max_num_batched_tokens=8)
    requests = {
        f"{name}-{k}": (params, whole[name][:k]) for name, params in CASES.items() for k in (1, 6)
    }
    outs = run(llm, requests)
    for rid, (_, resume) in requests.items():
        name = rid.rsplit("-", 1)[0]
        assert resume + outs[rid].new_token_ids == whole[name], rid
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_cached_tokens_count_only_the_prompt(llm, whole):
    """A resumed request hits the prefix cache on prompt + output blocks, but reports at most
    the prompt as cached."""
    out = run(llm, {"c": (CASES["greedy"], whole["greedy"][:9])})["c"]
    assert 0 < out.num_cached_tokens <= len(PROMPT)


@pytest.mark.parametrize(
    ("resume", "params", "message"),
    [
        ([1, 96], CASES["greedy"], "resume token ids must be in"),
        ([5] * MAX_TOKENS, CASES["greedy"], "leave nothing to generate"),
        ([5] * 115, SamplingParams(max_tokens=120), "leave no room in the context"),
    ],
)
def test_bad_resumes_are_refused_and_hold_nothing(llm, resume, params, message):
    with pytest.raises(RequestError, match=message):
        llm.add_request("bad", PROMPT, params, resume_token_ids=resume)
    assert not llm.has_unfinished_requests()
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
