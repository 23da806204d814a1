"""OutputProcessor with the real tokenizer: UTF-8-safe deltas, stop strings matched on text
across deltas (cut, finish "stop"), logprob token text, finish and usage."""

from __future__ import annotations

import pytest

from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.tokenizer import Tokenizer
from splitserve.model.loader import Checkpoint
from splitserve.router.dispatch import WorkerTokens
from splitserve.router.generation import GenerationDelta, OutputProcessor
from splitserve.router.validation import ValidatedRequest
from splitserve.v1 import pb

PROMPT = [1, 2, 3]


@pytest.fixture(scope="module")
def tok(smollm2_checkpoint: Checkpoint) -> Tokenizer:
    assert smollm2_checkpoint.tokenizer is not None
    return smollm2_checkpoint.tokenizer


def run(
    tok: Tokenizer, ids: list[int], finish: int = pb.FINISH_REASON_LENGTH, **params: object
) -> list[GenerationDelta]:
    """Feed `ids` one token per worker message, the last one carrying `finish`."""
    request = ValidatedRequest("r1", PROMPT, SamplingParams(max_tokens=len(ids), **params))
    proc = OutputProcessor(tok, request)
    deltas = []
    for i, t in enumerate(ids):
        last = i == len(ids) - 1
        deltas.append(proc.process(WorkerTokens([t], finish_reason=finish if last else 0)))
        if deltas[-1].finish_reason is not None:
            break
    return deltas


def test_no_broken_utf8_in_any_delta(tok: Tokenizer) -> None:
    text = "日本語のテキスト héllo 🙂"
    ids = tok.encode(text, add_special_tokens=False)
    deltas = run(tok, ids)
    assert all("\ufffd" not in d.text for d in deltas)
    assert "".join(d.text for d in deltas) == text
    assert deltas[-1].finish_reason == "length"
    assert deltas[-1].usage is not None and deltas[-1].usage.completion_tokens == len(ids)


def test_stop_string_across_deltas_is_cut_and_ends_the_request(tok: Tokenizer) -> None:
    ids = tok.encode("The answer is 42. END of story, more text", add_special_tokens=False)
    deltas = run(tok, ids, stop=("END of",))
    last = deltas[-1]
    assert (last.finish_reason, last.stop_reason) == ("stop", "END of")
    assert "".join(d.text for d in deltas) == "The answer is 42. "
    assert len(deltas) < len(ids)  # stopped before the worker's stream ended


def test_text_that_might_start_a_stop_string_is_held_back(tok: Tokenizer) -> None:
    ids = tok.encode("one two three", add_special_tokens=False)
    deltas = run(tok, ids, stop=("three four",))
    assert not any("thr" in d.text for d in deltas[:-1])
    assert "".join(d.text for d in deltas) == "one two three"  # released at the finish


def test_stop_token_id_is_reported(tok: Tokenizer) -> None:
    ids = tok.encode("Hello world", add_special_tokens=False)
    deltas = run(tok, ids, finish=pb.FINISH_REASON_STOP, stop_token_ids=(ids[-1],))
    assert (deltas[-1].finish_reason, deltas[-1].stop_reason) == ("stop", ids[-1])


def test_special_tokens_are_not_text_but_name_their_logprob(tok: Tokenizer) -> None:
    eos = tok.eos_token_ids[0]
    hello = tok.encode("Hi", add_special_tokens=False)[0]
    request = ValidatedRequest("r1", PROMPT, SamplingParams(logprobs=1))
    proc = OutputProcessor(tok, request)
    logprobs = [
        pb.TokenLogprob(logprob=-0.5, top=[pb.TopLogprob(token_id=hello, logprob=-0.5)]),
        pb.TokenLogprob(logprob=-0.1, top=[pb.TopLogprob(token_id=eos, logprob=-0.1)]),
    ]
    delta = proc.process(WorkerTokens([hello, eos], logprobs, pb.FINISH_REASON_STOP, 0))
    assert delta.text == "Hi"
    assert [lp.token for lp in delta.logprobs] == ["Hi", "<|im_end|>"]
    assert delta.logprobs[1].top[0].token == "<|im_end|>" and delta.logprobs[0].logprob == -0.5
    assert delta.usage is not None and delta.usage.prompt_tokens == len(PROMPT)


def test_cached_tokens_and_abort(tok: Tokenizer) -> None:
    proc = OutputProcessor(tok, ValidatedRequest("r1", PROMPT, SamplingParams()))
    proc.process(WorkerTokens([5], num_cached_tokens=16))
    last = proc.process(WorkerTokens([], finish_reason=pb.FINISH_REASON_ABORT))
    assert last.finish_reason == "abort" and last.usage is not None
    assert (last.usage.completion_tokens, last.usage.cached_tokens) == (1, 16)
    with pytest.raises(RuntimeError):
        proc.process(WorkerTokens([6]))
