import math
from collections.abc import Sequence

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from splitserve.engine.sampler import (
    Sampler,
    SamplingRow,
    filter_probs,
    make_generator,
    position_seed,
)
from splitserve.engine.sampling_params import SamplingParams

EOS = 3


def row(
    params: SamplingParams | None = None,
    prompt: Sequence[int] = (),
    output: Sequence[int] = (),
    generator: torch.Generator | None = None,
) -> SamplingRow:
    params = params or SamplingParams()
    if generator is None and params.seed is not None:
        generator = make_generator(params.seed)
    return SamplingRow(params, generator, list(prompt), list(output))


def logits_for(probs: Sequence[float]) -> torch.Tensor:
    return torch.tensor(probs).log().unsqueeze(0)


def allowed(scores: torch.Tensor) -> set[int]:
    """Token ids a (1, V) HF-processed score row still allows."""
    return set(torch.nonzero(scores[0] > float("-inf")).flatten().tolist())


GREEDY = SamplingParams(temperature=0.0)


# --- greedy -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax(dtype: torch.dtype) -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)).to(dtype)
    out = Sampler()(logits, [row(GREEDY)] * 6)
    assert out.token_ids == logits.float().argmax(-1).tolist()
    assert out.logprobs == [None] * 6 and out.top_logprobs == [None] * 6


def test_greedy_ties_take_first_index_on_both_paths() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0, 2.0]])
    assert Sampler()(logits, [row(GREEDY)]).token_ids == [1]  # fast path
    with_logprobs = SamplingParams(temperature=0.0, logprobs=1)
    assert Sampler()(logits, [row(with_logprobs)]).token_ids == [1]  # general path


def test_greedy_rows_in_a_mixed_batch_are_argmax_of_penalised_logits() -> None:
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(1))
    rep = SamplingParams(temperature=0.0, repetition_penalty=1.3)
    rows = [row(GREEDY), row(SamplingParams(seed=1)), row(rep, prompt=[5], output=[7]), row(GREEDY)]
    out = Sampler()(logits, rows)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([[5, 7]]), logits[2:3].clone())
    assert out.token_ids[0] == logits[0].argmax().item()
    assert out.token_ids[2] == expected.argmax().item()
    assert out.token_ids[3] == logits[3].argmax().item()


def test_input_logits_are_not_modified() -> None:
    logits = torch.randn(2, 20)
    before = logits.clone()
    p = SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0, min_tokens=5, top_k=3)
    Sampler(eos_token_ids=[EOS])(logits, [row(p, prompt=[1, 2], output=[4])] * 2)
    assert torch.equal(logits, before)


# --- filters against references ---------------------------------------------------------------


def test_top_k_keeps_exactly_k_matching_hf() -> None:
    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(2))
    for k in (1, 2, 7, 39):
        probs = filter_probs(logits, [SamplingParams(top_k=k)])
        kept = set(torch.nonzero(probs[0]).flatten().tolist())
        assert len(kept) == k
        assert kept == allowed(TopKLogitsWarper(k)(None, logits.clone()))
        assert kept == set(logits[0].topk(k).indices.tolist())


@pytest.mark.parametrize("k", [0, -1, 40, 1000])
def test_top_k_disabled(k: int) -> None:
    logits = torch.randn(1, 40)
    probs = filter_probs(logits, [SamplingParams(top_k=k)])
    torch.testing.assert_close(probs, logits.softmax(-1))


def reference_top_p(probs: list[float], p: float) -> set[int]:
    """Most likely first, keep adding until the kept mass reaches p (the crossing one stays)."""
    kept, mass = set(), 0.0
    for i in sorted(range(len(probs)), key=lambda i: -probs[i]):
        kept.add(i)
        mass += probs[i]
        if mass >= p:
            break
    return kept


@pytest.mark.parametrize(
    ("p", "expected"), [(0.3, {3}), (0.5, {3, 2}), (0.75, {3, 2, 1}), (0.95, {3, 2, 1, 0})]
)
def test_top_p_keeps_the_token_that_crosses_p(p: float, expected: set[int]) -> None:
    probs = [0.1, 0.2, 0.3, 0.4]
    out = filter_probs(logits_for(probs), [SamplingParams(top_p=p)])
    assert set(torch.nonzero(out[0]).flatten().tolist()) == expected == reference_top_p(probs, p)
    kept_mass = sum(probs[i] for i in expected)
    for i in expected:  # renormalised over the nucleus
        assert out[0, i].item() == pytest.approx(probs[i] / kept_mass, rel=1e-5)


def test_top_p_random_matches_reference_and_hf() -> None:
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        logits = torch.randn(1, 64, generator=gen) * 2
        p = float(torch.rand(1, generator=gen).item()) * 0.98 + 0.01
        out = filter_probs(logits, [SamplingParams(top_p=p)])
        kept = set(torch.nonzero(out[0]).flatten().tolist())
        assert kept == reference_top_p(logits.softmax(-1)[0].tolist(), p)
        assert kept == allowed(TopPLogitsWarper(p)(None, logits.clone()))


def test_tiny_top_p_keeps_the_top_token() -> None:
    logits = torch.tensor([[1.0, 5.0, 2.0]])
    probs = filter_probs(logits, [SamplingParams(top_p=1e-12)])
    assert probs.tolist() == [[0.0, 1.0, 0.0]]
    assert Sampler()(logits, [row(SamplingParams(top_p=1e-12))]).token_ids == [1]


def test_min_p_threshold_is_relative_to_max_prob() -> None:
    probs = [0.05, 0.15, 0.3, 0.5]
    for min_p, expected in ((0.0, {0, 1, 2, 3}), (0.2, {1, 2, 3}), (0.5, {2, 3}), (0.9, {3})):
        reference = {i for i, q in enumerate(probs) if q >= min_p * max(probs)}
        out = filter_probs(logits_for(probs), [SamplingParams(min_p=min_p)])
        assert set(torch.nonzero(out[0]).flatten().tolist()) == expected == reference


def test_min_p_random_matches_hf() -> None:
    gen = torch.Generator().manual_seed(4)
    for min_p in (0.01, 0.05, 0.1, 0.3, 0.7):
        logits = torch.randn(1, 64, generator=gen) * 3
        out = filter_probs(logits, [SamplingParams(min_p=min_p)])
        hf = MinPLogitsWarper(min_p)(None, logits.clone())
        assert set(torch.nonzero(out[0]).flatten().tolist()) == allowed(hf)


def test_combined_filters_per_row_match_hf_chain() -> None:
    gen = torch.Generator().manual_seed(5)
    configs = [(5, 0.9, 0.0), (0, 0.6, 0.1), (20, 1.0, 0.2), (3, 0.5, 0.5), (0, 1.0, 0.0)]
    logits = torch.randn(len(configs), 48, generator=gen) * 2
    params = [SamplingParams(top_k=k, top_p=p, min_p=m) for k, p, m in configs]
    out = filter_probs(logits, params)  # all rows in one batch, different parameters
    for i, (k, p, m) in enumerate(configs):
        scores = logits[i : i + 1].clone()
        if k:
            scores = TopKLogitsWarper(k)(None, scores)
        if p < 1:
            scores = TopPLogitsWarper(p)(None, scores)
        if m:
            scores = MinPLogitsWarper(m)(None, scores)
        torch.testing.assert_close(out[i : i + 1], scores.softmax(-1))


# --- penalties --------------------------------------------------------------------------------


def processed_logits(logits: torch.Tensor, r: SamplingRow) -> torch.Tensor:
    return Sampler().process_logits(logits, [r])


def test_repetition_penalty_matches_hf_over_prompt_and_output() -> None:
    logits = torch.randn(1, 32, generator=torch.Generator().manual_seed(6)) * 3
    prompt, output = [1, 4, 4, 9], [9, 17, 30]
    for penalty in (0.5, 1.2, 2.0):
        params = SamplingParams(repetition_penalty=penalty)
        ours = processed_logits(logits, row(params, prompt, output))
        hf = RepetitionPenaltyLogitsProcessor(penalty)(
            torch.tensor([prompt + output]), logits.clone()
        )
        torch.testing.assert_close(ours, hf)


def test_presence_and_frequency_follow_openai_formula_over_output_only() -> None:
    logits = torch.randn(1, 16, generator=torch.Generator().manual_seed(7))
    prompt, output = [2, 2, 5], [5, 7, 7, 7, 11]
    params = SamplingParams(presence_penalty=0.7, frequency_penalty=-0.4)
    ours = processed_logits(logits, row(params, prompt, output))
    expected = logits.clone()
    for j in range(16):
        c = output.count(j)
        expected[0, j] -= c * -0.4 + (1.0 if c > 0 else 0.0) * 0.7
    torch.testing.assert_close(ours, expected)


def test_penalties_are_per_row_in_a_batch() -> None:
    logits = torch.randn(3, 16, generator=torch.Generator().manual_seed(8))
    rows = [
        row(SamplingParams(repetition_penalty=1.5), prompt=[1], output=[2]),
        row(SamplingParams(), prompt=[1], output=[2]),
        row(SamplingParams(frequency_penalty=1.0), prompt=[1], output=[2, 2]),
    ]
    out = Sampler().process_logits(logits, rows)
    for i, r in enumerate(rows):
        torch.testing.assert_close(out[i : i + 1], processed_logits(logits[i : i + 1], r))
    torch.testing.assert_close(out[1], logits[1])


def test_out_of_vocab_history_ids_are_ignored() -> None:
    logits = torch.randn(1, 8)
    r = row(SamplingParams(repetition_penalty=2.0, presence_penalty=1.0), prompt=[100], output=[8])
    torch.testing.assert_close(processed_logits(logits, r), logits)


# --- min_tokens -------------------------------------------------------------------------------


def test_min_tokens_masks_eos_and_stop_ids_until_reached() -> None:
    logits = torch.zeros(1, 8)
    logits[0, EOS], logits[0, 6] = 10.0, 9.0  # EOS, then a stop token, are most likely
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(6,))
    sampler = Sampler(eos_token_ids=[EOS])
    assert sampler(logits, [row(params, output=[1])]).token_ids != [EOS]
    assert sampler(logits, [row(params, output=[1])]).token_ids != [6]
    assert sampler(logits, [row(params, output=[1, 1])]).token_ids == [EOS]
    ignore = SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=True)
    assert sampler(logits, [row(ignore)]).token_ids == [EOS]  # EOS does not stop it anyway


def test_min_tokens_masking_in_sampled_rows() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0, 8.0]])  # EOS takes ~99.9% of the mass
    sampler = Sampler(seed=1, eos_token_ids=[EOS])
    params = SamplingParams(min_tokens=1)
    tokens = sampler(logits.expand(200, 4), [row(params)] * 200).token_ids
    assert EOS not in tokens


# --- seeds and the distribution ---------------------------------------------------------------


def test_seeded_request_is_independent_of_batch_and_position() -> None:
    vocab = 64
    target = SamplingParams(seed=1234, temperature=0.9, top_k=20, top_p=0.95)
    others = [SamplingParams(temperature=1.2), SamplingParams(seed=7), GREEDY, SamplingParams()]

    def run(position: int | None) -> list[int]:
        gen = torch.Generator().manual_seed(99)
        sampler = Sampler(seed=position or 0)
        target_gen = make_generator(target.seed)
        other_gens = [make_generator(p.seed) for p in others]
        tokens: list[int] = []
        for _ in range(20):
            rows = [row(p, generator=g) for p, g in zip(others, other_gens, strict=True)]
            mine = SamplingRow(target, target_gen, [1, 2], list(tokens))
            index = position or 0
            batch = [mine] if position is None else [*rows[:index], mine, *rows[index:]]
            logits = torch.randn(len(batch), vocab, generator=gen)
            # The target row's logits must not depend on the batch either.
            logits[index] = torch.sin(torch.arange(vocab) * (len(tokens) + 1.0))
            tokens.append(sampler(logits, batch).token_ids[index])
        return tokens

    alone = run(None)
    assert len(set(alone)) > 1  # actually sampling
    for position in range(5):
        assert run(position) == alone


def chi_square(tokens: list[int], probs: Sequence[float]) -> float:
    n = len(tokens)
    return sum((tokens.count(i) - n * p) ** 2 / (n * p) for i, p in enumerate(probs) if p > 0)


# 99.9th percentile of chi-square with 3 and 2 degrees of freedom; seeded, so not flaky.
CHI2_3DF, CHI2_2DF = 16.27, 13.82


def test_sampling_distribution_shared_generator() -> None:
    probs = [0.1, 0.2, 0.3, 0.4]
    tokens = Sampler(seed=11)(logits_for(probs).expand(4000, 4), [row()] * 4000).token_ids
    assert chi_square(tokens, probs) < CHI2_3DF


def test_sampling_distribution_one_seeded_request_over_steps() -> None:
    probs = [0.1, 0.2, 0.3, 0.4]
    sampler, params = Sampler(), SamplingParams(seed=5)
    gen = make_generator(params.seed)
    tokens: list[int] = []
    for _ in range(2000):  # each step one output position further
        tokens += sampler(logits_for(probs), [row(params, output=tokens, generator=gen)]).token_ids
    assert chi_square(tokens, probs) < CHI2_3DF


def test_a_seeded_draw_depends_only_on_the_seed_and_the_output_position() -> None:
    """Per-position seeding: sampling resumed at any position (another worker, a fresh
    generator) draws exactly what the uninterrupted run drew there."""
    vocab = 64
    params = SamplingParams(seed=77, temperature=1.0)

    def logits_at(position: int) -> torch.Tensor:
        return torch.sin(torch.arange(vocab) * (position + 1.0)).unsqueeze(0) * 3

    def run(start: list[int], steps: int) -> list[int]:
        gen = make_generator(params.seed)
        tokens = list(start)
        for _ in range(steps):
            out = Sampler()(logits_at(len(tokens)), [row(params, output=tokens, generator=gen)])
            tokens += out.token_ids
        return tokens

    whole = run([], 16)
    assert len(set(whole)) > 4  # actually sampling
    for k in (0, 1, 5, 15):
        assert run(whole[:k], 16 - k) == whole, k
    # A draw that is not a function of the generator's history: the same position twice.
    gen = make_generator(params.seed)
    twice = [Sampler()(logits_at(3), [row(params, output=whole[:3], generator=gen)]) for _ in "ab"]
    assert twice[0].token_ids == twice[1].token_ids == [whole[3]]
    # Another seed draws another sequence.
    other = SamplingParams(seed=78, temperature=1.0)
    gen = make_generator(other.seed)
    tokens: list[int] = []
    for _ in range(16):
        out = Sampler()(logits_at(len(tokens)), [row(other, output=tokens, generator=gen)])
        tokens += out.token_ids
    assert tokens != whole


def test_position_seeds_are_distinct_and_take_any_int64_seed() -> None:
    seeds = {position_seed(s, i) for s in (-(2**63), -1, 0, 1, 2**63 - 1) for i in range(100)}
    assert len(seeds) == 500 and all(0 <= x < 2**64 for x in seeds)
    torch.Generator().manual_seed(max(seeds))  # the generator takes every value


def test_sampling_distribution_with_temperature_and_top_k() -> None:
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    params = SamplingParams(temperature=0.5, top_k=3)
    tokens = Sampler(seed=12)(probs.log().expand(4000, 4), [row(params)] * 4000).token_ids
    expected = probs**2  # temperature 0.5 squares the probabilities
    expected[0] = 0.0
    expected = (expected / expected.sum()).tolist()
    assert 0 not in tokens
    assert chi_square(tokens, expected) < CHI2_2DF


# --- logprobs ---------------------------------------------------------------------------------


def test_logprobs_are_of_the_raw_distribution_and_sorted() -> None:
    logits = (torch.randn(3, 40, generator=torch.Generator().manual_seed(13)) * 2).bfloat16()
    rows = [
        row(SamplingParams(temperature=0.3, repetition_penalty=1.5, top_k=5, logprobs=5), [1]),
        row(SamplingParams(seed=3)),
        row(SamplingParams(temperature=0.0, logprobs=0)),
    ]
    out = Sampler()(logits, rows)
    raw = torch.log_softmax(logits.float(), dim=-1)
    assert out.logprobs[0] == pytest.approx(raw[0, out.token_ids[0]].item(), abs=1e-6)
    assert out.logprobs[1] is None and out.top_logprobs[1] is None
    assert out.logprobs[2] == pytest.approx(raw[2].max().item(), abs=1e-6)
    assert out.top_logprobs[2] == []
    top = out.top_logprobs[0]
    assert top is not None and len(top) == 5
    assert [t for t, _ in top] == raw[0].topk(5).indices.tolist()
    assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
    for t, v in top:
        assert v == pytest.approx(raw[0, t].item(), abs=1e-6)


# --- robustness -------------------------------------------------------------------------------


def test_all_masked_row_raises() -> None:
    logits = torch.tensor([[0.0, 1.0], [float("-inf"), float("-inf")]])
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        Sampler()(logits, [row(GREEDY), row(GREEDY)])
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        Sampler()(logits, [row(), row()])


def test_extreme_logits_and_temperatures_stay_finite() -> None:
    big = 3e38  # near float32's max: dividing it by a small temperature would overflow
    logits = torch.tensor([[big, -big, 0.0, float("-inf")], [3.0, 3.0, 3.0, float("-inf")]])
    for temperature in (1e-5, 1e-3, 1.0, 50.0):
        p = SamplingParams(temperature=temperature, logprobs=2)
        out = Sampler()(logits, [row(p), row(p)])
        assert out.token_ids[0] == 0
        assert out.token_ids[1] != 3
        assert all(math.isfinite(v) for v in out.logprobs if v is not None)


@st.composite
def valid_params(draw: st.DrawFn) -> SamplingParams:
    max_tokens = draw(st.integers(1, 64))
    return SamplingParams(
        max_tokens=max_tokens,
        min_tokens=draw(st.integers(0, max_tokens)),
        temperature=draw(st.sampled_from([0.0, 1e-5]) | st.floats(0.0, 5.0)),
        top_p=draw(st.floats(1e-9, 1.0)),
        top_k=draw(st.integers(-1, 20)),
        min_p=draw(st.floats(0.0, 1.0)),
        repetition_penalty=draw(st.floats(0.05, 5.0)),
        presence_penalty=draw(st.floats(-2.0, 2.0)),
        frequency_penalty=draw(st.floats(-2.0, 2.0)),
        seed=draw(st.none() | st.integers(0, 2**32)),
        stop_token_ids=tuple(draw(st.lists(st.integers(0, 15), max_size=3))),
        ignore_eos=draw(st.booleans()),
        logprobs=draw(st.none() | st.integers(0, 20)),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    params=st.lists(valid_params(), min_size=1, max_size=4),
    scale=st.sampled_from([0.1, 1.0, 30.0]),
    data=st.data(),
)
def test_any_valid_params_give_in_range_tokens_and_finite_logprobs(
    params: list[SamplingParams], scale: float, data: st.DataObject
) -> None:
    vocab = 16
    history = st.lists(st.integers(0, vocab - 1), max_size=6)
    for p in params:
        p.validate(vocab_size=vocab, max_model_len=64)
    rows = [row(p, data.draw(history), data.draw(history)) for p in params]
    seed = data.draw(st.integers(0, 2**16))
    logits = torch.randn(len(rows), vocab, generator=torch.Generator().manual_seed(seed)) * scale
    out = Sampler(seed=seed, eos_token_ids=[EOS])(logits, rows)
    for p, token, lp, top in zip(
        params, out.token_ids, out.logprobs, out.top_logprobs, strict=True
    ):
        assert 0 <= token < vocab
        if p.logprobs is None:
            assert lp is None and top is None
        else:
            assert lp is not None and math.isfinite(lp)
            assert top is not None and len(top) == min(p.logprobs, vocab)


def test_logit_bias_is_added_per_row_and_leaves_logprobs_raw() -> None:
    logits = torch.randn(3, 50)
    ban = int(logits[0].argmax())
    rows = [
        row(SamplingParams(temperature=0, logit_bias={ban: -100.0}, logprobs=0)),
        row(SamplingParams(temperature=0.9, seed=4, logit_bias={7: 100.0})),
        row(SamplingParams(temperature=0)),  # no bias: untouched in the same batch
    ]
    out = Sampler()(logits, rows)
    biased = logits[0].clone()
    biased[ban] -= 100.0
    assert out.token_ids == [int(biased.argmax()), 7, int(logits[2].argmax())]
    raw = torch.log_softmax(logits[0], -1)[out.token_ids[0]]  # the model's, not the biased
    assert out.logprobs[0] == pytest.approx(float(raw), abs=1e-6)
