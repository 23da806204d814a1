import math

import pytest

from splitserve.engine.sampling_params import SamplingParams, SamplingParamsError


def test_defaults_are_valid() -> None:
    SamplingParams().validate(vocab_size=100, max_model_len=2048)


def test_construction_never_raises_and_coerces_lists() -> None:
    p = SamplingParams(temperature=-1.0, stop=["a", "b"], stop_token_ids=[1, 2])  # type: ignore[arg-type]
    assert p.stop == ("a", "b")
    assert p.stop_token_ids == (1, 2)
    hash(p)  # frozen and hashable once lists are tuples


def test_single_stop_string_is_one_stop() -> None:
    assert SamplingParams(stop="END").stop == ("END",)  # type: ignore[arg-type]


def test_is_greedy() -> None:
    assert SamplingParams(temperature=0.0).is_greedy
    assert not SamplingParams(temperature=0.7).is_greedy


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.1}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": math.nan}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"frequency_penalty": math.inf}, "frequency_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 4097}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
        ({"stop": tuple(f"s{i}" for i in range(17))}, "stop"),
        ({"stop": ("ok", "")}, "stop"),
        ({"stop_token_ids": (5, 100)}, "stop_token_ids"),
        ({"stop_token_ids": (-1,)}, "stop_token_ids"),
        ({"seed": 2**64}, "seed"),
        ({"seed": "42"}, "seed"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": 21}, "logprobs"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
    ],
)
def test_validate_rejects_with_field_name(kwargs: dict, field: str) -> None:
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**kwargs).validate(vocab_size=100, max_model_len=4096)
    message = str(info.value)
    assert message.startswith(field + " ")
    assert "\n" not in message
    assert isinstance(info.value, ValueError)


def test_max_model_len_only_checked_when_given() -> None:
    SamplingParams(max_tokens=100_000).validate()
    SamplingParams(stop_token_ids=(10**6,)).validate()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 0.0, "top_k": -1},
        {"top_p": 1e-9, "top_k": 1, "min_p": 1.0},
        {"repetition_penalty": 2.0, "presence_penalty": -2.0, "frequency_penalty": 2.0},
        {"logprobs": 0},
        {"logprobs": 20},
        {"seed": -(2**63)},
        {"min_tokens": 16},
        {"stop": tuple(f"s{i}" for i in range(16)), "stop_token_ids": (0, 99)},
    ],
)
def test_validate_accepts_edges(kwargs: dict) -> None:
    SamplingParams(**kwargs).validate(vocab_size=100, max_model_len=4096)
