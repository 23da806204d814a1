"""The stored transformers answers (tests/hf_golden.py) are current: made for the installed
weights and versions, and what transformers gives now, asked again for two of the prompts."""

from __future__ import annotations

import hf_golden
import pytest
from hf_ref import hf_greedy

pytestmark = pytest.mark.slow


def test_the_golden_file_is_for_these_weights_and_versions(smollm2_path, engine_prompts):
    data = hf_golden.stored()
    assert data["key"] == hf_golden.key(smollm2_path), (
        "tests/data/smollm2_hf_greedy.json was made for other weights or versions: "
        "run `python tests/hf_golden.py` and commit the file"
    )
    assert data["prompts"] == engine_prompts
    assert hf_golden.load(smollm2_path, engine_prompts) is not None


@pytest.mark.parametrize("index", hf_golden.LIVE_CHECKED)
def test_transformers_still_gives_the_stored_answer(hf_reference, engine_prompts, index):
    model, _ = hf_reference
    tokens, logprobs = hf_greedy(model, engine_prompts[index], hf_golden.NEW_TOKENS)
    stored = hf_golden.stored()["references"][index]
    assert tokens == stored["tokens"]
    worst = max(abs(a - b) for a, b in zip(logprobs, stored["logprobs"], strict=True))
    assert worst < 1e-4, worst
