"""Per-request sampling parameters, with the validation the services map to a status code.

`SamplingParams` is built straight from user input, so construction never raises: the services
call `validate()` and turn a `SamplingParamsError` into INVALID_ARGUMENT with its message.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NoReturn

# Below this a temperature is treated as greedy: dividing logits by it overflows float32.
GREEDY_TEMPERATURE_EPS = 1e-5
MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for each logit_bias value: [-100, 100]
MAX_LOGIT_BIAS_ENTRIES = 1024
# torch.Generator.manual_seed accepts exactly this range.
_SEED_MIN = -(2**63)
_SEED_MAX = 2**64 - 1


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range; the message is one line naming the field."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0  # below GREEDY_TEMPERATURE_EPS (e.g. 0) => greedy
    top_p: float = 1.0  # (0, 1]
    top_k: int = 0  # 0 or -1 => disabled; larger than the vocabulary => disabled
    min_p: float = 0.0  # [0, 1], relative to the most likely token's probability
    repetition_penalty: float = 1.0  # > 0, HF semantics, over prompt + output tokens
    presence_penalty: float = 0.0  # [-2, 2], OpenAI semantics, over output tokens
    frequency_penalty: float = 0.0  # [-2, 2], OpenAI semantics, over output tokens
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; N: chosen token's logprob + top-N alternatives
    # (token id, bias) pairs added to the logits before anything else (OpenAI's logit_bias).
    logit_bias: tuple[tuple[int, float], ...] = ()
    # None: none; N: each prompt token's logprob (the first has none) + top-N alternatives.
    prompt_logprobs: int | None = None
    # Structured output: a GuidedSpec (engine/guided.py) the output must match; None: free text.
    guided: Any = None

    def __post_init__(self) -> None:
        # Frozen, so coercion goes through object.__setattr__; bad values are left for validate().
        object.__setattr__(self, "stop", _as_tuple(self.stop, single_str=True))
        object.__setattr__(self, "stop_token_ids", _as_tuple(self.stop_token_ids))
        bias = self.logit_bias
        if isinstance(bias, dict):
            bias = tuple(sorted(bias.items()))
        bias = _as_tuple(bias)
        if isinstance(bias, tuple):
            bias = tuple(tuple(b) if isinstance(b, list) else b for b in bias)
        object.__setattr__(self, "logit_bias", bias)

    @property
    def is_greedy(self) -> bool:
        return _is_number(self.temperature) and self.temperature < GREEDY_TEMPERATURE_EPS

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    def validate(self, vocab_size: int | None = None, max_model_len: int | None = None) -> None:
        """Raise SamplingParamsError for the first field out of range."""
        self._validate_lengths(max_model_len)
        self._validate_distribution()
        self._validate_penalties()
        self._validate_stops(vocab_size)
        self._validate_logit_bias(vocab_size)
        self._validate_misc()

    def _validate_lengths(self, max_model_len: int | None) -> None:
        _check_int("max_tokens", self.max_tokens, lo=1, hi=max_model_len)
        _check_int("min_tokens", self.min_tokens, lo=0, hi=self.max_tokens)

    def _validate_distribution(self) -> None:
        _check_float("temperature", self.temperature, lo=0.0)
        _check_float("top_p", self.top_p, lo=0.0, hi=1.0, lo_open=True)
        if not _is_int(self.top_k) or self.top_k < -1:
            _fail("top_k", self.top_k, "-1 or 0 (disabled) or an integer >= 1")
        _check_float("min_p", self.min_p, lo=0.0, hi=1.0)

    def _validate_penalties(self) -> None:
        _check_float("repetition_penalty", self.repetition_penalty, lo=0.0, lo_open=True)
        _check_float("presence_penalty", self.presence_penalty, lo=-2.0, hi=2.0)
        _check_float("frequency_penalty", self.frequency_penalty, lo=-2.0, hi=2.0)

    def _validate_stops(self, vocab_size: int | None) -> None:
        if not isinstance(self.stop, tuple):
            _fail("stop", self.stop, "a list of non-empty strings")
        if len(self.stop) > MAX_STOP_STRINGS:
            _fail("stop", f"{len(self.stop)} strings", f"at most {MAX_STOP_STRINGS} strings")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                _fail("stop", s, "non-empty strings")
        if not isinstance(self.stop_token_ids, tuple):
            _fail("stop_token_ids", self.stop_token_ids, "a list of token ids")
        hi = vocab_size - 1 if vocab_size is not None else None
        for tid in self.stop_token_ids:
            _check_int("stop_token_ids", tid, lo=0, hi=hi)

    def _validate_logit_bias(self, vocab_size: int | None) -> None:
        bias = self.logit_bias
        if not isinstance(bias, tuple) or len(bias) > MAX_LOGIT_BIAS_ENTRIES:
            _fail("logit_bias", bias, f"at most {MAX_LOGIT_BIAS_ENTRIES} (token id, bias) pairs")
        hi = vocab_size - 1 if vocab_size is not None else None
        for pair in bias:
            if not isinstance(pair, tuple) or len(pair) != 2:
                _fail("logit_bias", pair, "(token id, bias) pairs")
            _check_int("logit_bias", pair[0], lo=0, hi=hi)
            _check_float("logit_bias", pair[1], lo=-MAX_LOGIT_BIAS, hi=MAX_LOGIT_BIAS)

    def _validate_misc(self) -> None:
        if self.seed is not None:
            _check_int("seed", self.seed, lo=_SEED_MIN, hi=_SEED_MAX)
        if not isinstance(self.ignore_eos, bool):
            _fail("ignore_eos", self.ignore_eos, "true or false")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, lo=0, hi=MAX_LOGPROBS)
        if self.guided is not None:
            from splitserve.engine.guided import GuidedSpec  # guided imports this module

            if not isinstance(self.guided, GuidedSpec):
                _fail("guided", self.guided, "a GuidedSpec")
            self.guided.check_shape()
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, lo=0, hi=MAX_LOGPROBS)


def _as_tuple(value: Any, single_str: bool = False) -> Any:
    if single_str and isinstance(value, str):
        return (value,)  # OpenAI allows `"stop": "foo"`; tuple("foo") would split it
    if isinstance(value, tuple | str | bytes) or not isinstance(value, Iterable):
        return value  # strings in stop_token_ids, None, numbers: validate() names the field
    return tuple(value)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _fail(field: str, value: object, allowed: str) -> NoReturn:
    raise SamplingParamsError(f"{field} must be {allowed}; got {value!r}")


def _check_int(field: str, value: object, lo: int, hi: int | None = None) -> None:
    allowed = f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}"
    if not _is_int(value) or value < lo or (hi is not None and value > hi):  # type: ignore[operator]
        _fail(field, value, allowed)


def _check_float(
    field: str, value: object, lo: float, hi: float | None = None, lo_open: bool = False
) -> None:
    left = "(" if lo_open else "["
    allowed = f"a finite number in {left}{lo}, {hi}]" if hi is not None else None
    if allowed is None:
        allowed = f"a finite number {'>' if lo_open else '>='} {lo}"
    if not _is_number(value) or not math.isfinite(value):  # type: ignore[arg-type]
        _fail(field, value, allowed)
    v = float(value)  # type: ignore[arg-type]
    if v < lo or (lo_open and v == lo) or (hi is not None and v > hi):
        _fail(field, value, allowed)
