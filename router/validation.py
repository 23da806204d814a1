"""One validator for both front doors, run before anything is tokenized, queued or sent.

    validator = RequestValidator(model_info, tokenizer, max_body_bytes=1 << 20)
    request = await validator.validate(GenerateInput(prompt="Hi", sampling={"temperature": 0}))

HTTP and gRPC each turn their wire format into a `GenerateInput` (untrusted values, any type)
and get back a `ValidatedRequest` or a `RequestValidationError`. The checks run cheapest first:
body size, model name, `n`, the input's shape and the sampling fields, and only then the
tokenizer; the prompt's length is checked against the context after tokenization, and
`max_tokens` is capped so that prompt + output fits the context.

Untrusted values never reach code that could fail on them: every sampling field is checked
against its type in the wire format (`SAMPLING_WIRE_TYPES`, the proto's SamplingOptions), so a
value that passes can always be sent to a worker; floats are rounded to float32 first, so the
range checks judge what the worker will see; text is checked to be encodable (a lone surrogate
from a JSON `\\ud800` escape would break the tokenizer); error messages show values through
`show`, bounded whatever their size or depth.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import struct
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from splitserve.engine.sampling_params import MAX_STOP_STRINGS, SamplingParams, SamplingParamsError
from splitserve.engine.tokenizer import Tokenizer

from .errors import (
    ModelNotFoundError,
    RequestTooLargeError,
    RequestValidationError,
    show,
)
from .structured import GuidedChecker

__all__ = [
    "GenerateInput",
    "ModelInfo",
    "RequestValidationError",
    "RequestValidator",
    "ValidatedRequest",
]

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
MAX_MESSAGES = 1024
MAX_ID_CHARS = 128
MAX_SALT_CHARS = 256
# Above this many characters tokenization goes to a thread so the event loop keeps serving.
THREAD_TOKENIZE_CHARS = 32_768
MAX_STOP_CHARS = 1024  # each stop string; the router matches them against every delta
DEFAULT_MAX_N = 16  # choices per prompt (n, best_of) unless the router says otherwise (--max-n)
MAX_PROMPTS = 256  # prompts in one request (a completions list, gRPC prompts / token_id_lists)

# Each SamplingOptions field's type in the wire format (protos/splitserve/v1): a value must
# fit it before SamplingParams judges its range, or building the worker's request would fail.
_INT_RANGES = {
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1),
}
SAMPLING_WIRE_TYPES: dict[str, str] = {
    "max_tokens": "uint32",
    "min_tokens": "uint32",
    "temperature": "float",
    "top_p": "float",
    "top_k": "int32",
    "min_p": "float",
    "repetition_penalty": "float",
    "presence_penalty": "float",
    "frequency_penalty": "float",
    "seed": "int64",
    "stop": "strings",  # the router's alone: workers never see text
    "stop_token_ids": "uint32s",
    "ignore_eos": "bool",
    "logprobs": "uint32",
    "logit_bias": "bias",  # {token id: bias}; ids as JSON strings or integers
    "prompt_logprobs": "uint32",
}


@dataclass(frozen=True)
class ModelInfo:
    """What the router serves: the name clients use and the limits requests are checked against."""

    name: str
    max_model_len: int
    vocab_size: int
    aliases: tuple[str, ...] = ()

    def matches(self, model: str | None) -> bool:
        return not model or model == self.name or model in self.aliases


@dataclass
class GenerateInput:
    """A request as a front door received it: values are untrusted and of any type."""

    model: Any = None
    prompt: Any = None  # text
    prompt_token_ids: Any = None  # pre-tokenized
    messages: Any = None  # chat: [{"role", "content"}]
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingParams fields
    n: Any = 1
    default_max_tokens: int | None = 16  # None: whatever context is left
    request_id: Any = None
    cache_salt: Any = None
    caller: str | None = None  # the caller's credential (Authorization), if it sent one
    tenant: str | None = None  # the authenticated API key's tenant; overrides `caller`
    disaggregate: bool | None = None
    body_bytes: int = 0
    best_of: Any = None  # None: n
    guided: Any = None  # structured output: a router/structured.py GuidedInput
    echo: Any = False  # completions only: the prompt (and its logprobs) before the output


@dataclass(frozen=True)
class ValidatedRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams  # max_tokens already capped to the context left
    cache_salt: str | None = None
    disaggregate: bool | None = None
    tenant: str | None = None  # the caller's tenant (None with authentication off)
    n: int = 1  # choices returned
    best_of: int = 1  # choices generated (>= n); the n with the highest cumulative logprob win
    echo: bool = False
    echo_text: str = ""  # with echo: the prompt as the client sent it (or its decoded ids)
    prompt_only: bool = False  # max_tokens 0 (with echo): the worker's one token is dropped

    @property
    def worker_request_id(self) -> str:
        """The id workers see: unique across tenants, who pick their request ids themselves
        (two tenants' equal ids must neither collide on a worker nor tell one of the other)."""
        return f"{self.tenant}/{self.request_id}" if self.tenant else self.request_id


@dataclass(frozen=True)
class _Checked:
    """Phase one's result: everything but the token ids."""

    request_id: str
    text: str | None
    token_ids: list[int] | None
    param: str  # where the prompt came from, for error messages
    params: SamplingParams
    max_tokens: int | None  # asked for or the front door's default; None: the context left
    cache_salt: str | None
    disaggregate: bool | None
    tenant: str | None
    n: int = 1
    best_of: int = 1
    echo: bool = False
    prompt_only: bool = False


class RequestValidator:
    def __init__(
        self,
        model: ModelInfo,
        tokenizer: Tokenizer,
        max_body_bytes: int,
        max_n: int = DEFAULT_MAX_N,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_body_bytes = max_body_bytes
        self.max_n = max_n
        self.guided = GuidedChecker(tokenizer, model.vocab_size)

    async def validate(self, raw: GenerateInput) -> ValidatedRequest:
        checked = self.check(raw)
        if raw.guided is not None:  # compiled once here: a bad spec is this request's 400
            spec = await self.guided.check(raw.guided)
            checked = replace(checked, params=replace(checked.params, guided=spec))
        if checked.text is not None and len(checked.text) > THREAD_TOKENIZE_CHARS:
            ids = await asyncio.to_thread(self.tokenize, checked)
        else:
            ids = self.tokenize(checked)
        return self.finish(checked, ids)

    # ---- phase one: no tokenizer -----------------------------------------------------------
    def check(self, raw: GenerateInput) -> _Checked:
        if raw.body_bytes > self.max_body_bytes:
            raise RequestTooLargeError(raw.body_bytes, self.max_body_bytes)
        if raw.model is not None and not isinstance(raw.model, str):
            raise _invalid("model", f"model must be a string; got {show(raw.model)}")
        if not self.model.matches(raw.model):
            raise ModelNotFoundError(raw.model, self.model.name)
        n, best_of = self._check_choices(raw)
        echo = _check_echo(raw)
        text, token_ids, param = self._check_input(raw)
        prompt_only = (
            echo and _is_int(raw.sampling.get("max_tokens")) and raw.sampling["max_tokens"] == 0
        )
        if prompt_only:  # the prompt's logprobs alone: the worker samples one token, dropped
            raw = replace(raw, sampling={**raw.sampling, "max_tokens": 1})
        params, max_tokens = self._check_sampling(raw)
        return _Checked(
            request_id=_check_request_id(raw.request_id),
            text=text,
            token_ids=token_ids,
            param=param,
            params=params,
            max_tokens=max_tokens,
            cache_salt=tenant_salt(_check_salt(raw.cache_salt), _tenant(raw)),
            disaggregate=raw.disaggregate,
            tenant=raw.tenant or None,
            n=n,
            best_of=best_of,
            echo=echo,
            prompt_only=prompt_only,
        )

    def _check_choices(self, raw: GenerateInput) -> tuple[int, int]:
        n = 1 if raw.n is None else raw.n
        if not _is_int(n) or not 1 <= n <= self.max_n:
            raise _invalid("n", f"n must be an integer in [1, {self.max_n}]; got {show(raw.n)}")
        best_of = n if raw.best_of is None else raw.best_of
        if not _is_int(best_of) or not n <= best_of <= self.max_n:
            raise _invalid(
                "best_of",
                f"best_of must be an integer in [n, {self.max_n}] (n={n}); got {show(raw.best_of)}",
            )
        return n, best_of

    def _check_input(self, raw: GenerateInput) -> tuple[str | None, list[int] | None, str]:
        given = [x is not None for x in (raw.prompt, raw.prompt_token_ids, raw.messages)]
        if sum(given) != 1:
            raise _invalid("prompt", "give exactly one of a prompt, token ids or chat messages")
        if raw.messages is not None:
            return self._chat_text(raw.messages), None, "messages"
        if raw.prompt is not None:
            if not isinstance(raw.prompt, str):
                kind = type(raw.prompt).__name__
                raise _invalid("prompt", f"prompt must be a string; got {kind}")
            if not raw.prompt:
                raise _empty("prompt")
            return _check_text("prompt", raw.prompt), None, "prompt"
        return None, self.check_token_ids(raw.prompt_token_ids), "prompt"

    def check_token_ids(self, ids: Any, param: str = "prompt") -> list[int]:
        if not isinstance(ids, list | tuple) or not all(_is_int(t) for t in ids):
            raise _invalid(param, "token ids must be a list of integers")
        if not ids:
            raise _empty(param)
        vocab = self.model.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise _invalid(param, f"token ids must be in [0, {vocab})")
        return list(ids)

    def _chat_text(self, messages: Any) -> str:
        turns = self.chat_turns(messages)
        try:
            return self.tokenizer.apply_chat_template(turns, add_generation_prompt=True)
        except Exception as e:  # a template's raise_exception() rejects the conversation
            raise _invalid("messages", f"the chat template rejected the messages: {e}") from e

    def chat_turns(self, messages: Any) -> list[dict[str, str]]:
        """Chat messages checked, as the template takes them."""
        if not isinstance(messages, list | tuple):
            raise _invalid("messages", "messages must be a list of {role, content} objects")
        if not messages:
            raise _empty("messages")
        if len(messages) > MAX_MESSAGES:
            raise _invalid("messages", f"at most {MAX_MESSAGES} messages are allowed")
        turns = [_check_message(i, m) for i, m in enumerate(messages)]
        if not any(t["content"] for t in turns):
            raise _empty("messages")
        return turns

    def _check_sampling(self, raw: GenerateInput) -> tuple[SamplingParams, int | None]:
        fields = check_wire_types(raw.sampling)
        max_tokens = fields.pop("max_tokens", None)
        if max_tokens is None:
            max_tokens = raw.default_max_tokens
        try:
            # 1 stands in for "the context left" until finish() knows the prompt's length.
            params = SamplingParams(max_tokens=1 if max_tokens is None else max_tokens, **fields)
            # max_tokens above the whole context is absurd whatever the prompt: reject it here.
            params.validate(self.model.vocab_size, self.model.max_model_len)
        except SamplingParamsError as e:
            raise _invalid(str(e).split(" ", 1)[0], str(e)) from e
        return params, max_tokens

    # ---- phase two: tokens ------------------------------------------------------------------
    def tokenize(self, checked: _Checked) -> list[int]:
        if checked.token_ids is not None:
            return checked.token_ids
        assert checked.text is not None  # invariant of _check_input, not an input check
        # A chat template writes the special tokens out itself.
        special = checked.param != "messages"
        return self.tokenizer.encode(checked.text, add_special_tokens=special)

    def finish(self, checked: _Checked, ids: list[int]) -> ValidatedRequest:
        if not ids:
            raise _empty(checked.param)
        context = self.model.max_model_len
        if len(ids) >= context:
            raise RequestValidationError(
                "context_length_exceeded",
                f"the prompt has {len(ids)} tokens; this model's context is {context} tokens, "
                f"so a prompt may have at most {context - 1}",
                checked.param,
            )
        room = context - len(ids)
        max_tokens = room if checked.max_tokens is None else min(checked.max_tokens, room)
        min_tokens = min(checked.params.min_tokens, max_tokens)
        params = replace(checked.params, max_tokens=max_tokens, min_tokens=min_tokens)
        echo_text = ""
        if checked.echo:
            echo_text = checked.text if checked.text is not None else self.tokenizer.decode(ids)
        return ValidatedRequest(
            request_id=checked.request_id,
            prompt_token_ids=ids,
            params=params,
            cache_salt=checked.cache_salt,
            disaggregate=checked.disaggregate,
            tenant=checked.tenant,
            n=checked.n,
            best_of=checked.best_of,
            echo=checked.echo,
            echo_text=echo_text,
            prompt_only=checked.prompt_only,
        )


def check_prompt_list(prompts: Any, param: str) -> list[Any]:
    """A request's list of prompts (texts or token-id lists), as either front door got it: at
    least one, at most MAX_PROMPTS, none empty (400 / INVALID_ARGUMENT naming `param`, and the
    element). Each element's own checks are the validator's, one request per prompt."""
    if not isinstance(prompts, list | tuple) or not prompts:
        raise _empty(param)
    if len(prompts) > MAX_PROMPTS:
        raise _invalid(param, f"{param} may hold at most {MAX_PROMPTS} prompts; got {len(prompts)}")
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str | list | tuple) and not prompt:
            raise RequestValidationError("empty_prompt", f"{param}[{i}] must not be empty", param)
    return list(prompts)


def _check_echo(raw: GenerateInput) -> bool:
    if raw.echo in (None, False):
        return False
    if raw.echo is not True:
        raise _invalid("echo", f"echo must be true or false; got {show(raw.echo)}")
    if raw.messages is not None:
        raise _invalid("echo", "echo is for completions, not chat")
    return True


def _check_message(index: int, message: Any) -> dict[str, str]:
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise _invalid(param, f"{param} must be an object with a role and content")
    role, content = message.get("role"), message.get("content")
    if not isinstance(role, str) or role not in CHAT_ROLES:  # a list or dict isn't hashable
        raise _invalid(f"{param}.role", f"{param}.role must be one of {sorted(CHAT_ROLES)}")
    if content is None:
        content = ""
    elif isinstance(content, list):
        content = _text_parts(param, content)
    elif not isinstance(content, str):
        raise _invalid(f"{param}.content", f"{param}.content must be a string or text parts")
    return {"role": role, "content": _check_text(f"{param}.content", content)}


def _text_parts(param: str, parts: list[Any]) -> str:
    """OpenAI's content parts; only text is supported by a text-only model."""
    texts = []
    for part in parts:
        if not isinstance(part, dict) or part.get("type") != "text":
            raise _invalid(f"{param}.content", "only text content parts are supported")
        if not isinstance(part.get("text"), str):
            raise _invalid(f"{param}.content", "a text content part needs a string `text`")
        texts.append(part["text"])
    return "".join(texts)


def _check_request_id(value: Any) -> str:
    if value in (None, ""):
        return f"cmpl-{uuid.uuid4().hex}"
    if not isinstance(value, str) or len(value) > MAX_ID_CHARS or not value.isprintable():
        raise _invalid("request_id", f"request_id must be printable, at most {MAX_ID_CHARS} chars")
    return value


def _check_salt(value: Any) -> str | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str) or len(value) > MAX_SALT_CHARS:
        raise _invalid("cache_salt", f"cache_salt must be a string of at most {MAX_SALT_CHARS}")
    return _check_text("cache_salt", value)


def check_wire_types(sampling: dict[str, Any]) -> dict[str, Any]:
    """The sampling fields, each checked against its wire type (`SAMPLING_WIRE_TYPES`), with
    floats rounded to float32; None means "not given" and is dropped (max_tokens: kept)."""
    out: dict[str, Any] = {}
    for name, value in sampling.items():
        kind = SAMPLING_WIRE_TYPES.get(name)
        if kind is None:
            raise _invalid(name, f"unsupported sampling option {show(name)}")
        if value is None:
            if name == "max_tokens":
                out[name] = None
            continue
        out[name] = _check_wire_value(name, kind, value)
    return out


def _check_wire_value(name: str, kind: str, value: Any) -> Any:
    if kind in _INT_RANGES:
        return _check_wire_int(name, kind, value)
    if kind == "float":
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise _invalid(name, f"{name} must be a number; got {show(value)}")
        try:
            as_float = float(value)
            rounded = struct.unpack("<f", struct.pack("<f", as_float))[0]
        except (OverflowError, struct.error):  # past float32's range (or an int past float's)
            raise _invalid(name, f"{name} is out of a float32's range; got {show(value)}") from None
        if not math.isfinite(rounded):
            raise _invalid(name, f"{name} must be a finite number; got {show(value)}")
        return rounded
    if kind == "bool":
        if not isinstance(value, bool):
            raise _invalid(name, f"{name} must be true or false; got {show(value)}")
        return value
    if kind == "bias":
        return _check_logit_bias(name, value)
    if kind == "uint32s":
        if not isinstance(value, list | tuple):
            raise _invalid(name, f"{name} must be a list of integers; got {show(value)}")
        return tuple(_check_wire_int(name, "uint32", v) for v in value)
    # "strings": OpenAI's stop is a string or a list of them
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(v, str) for v in items):
        raise _invalid(name, f"{name} must be a string or a list of strings; got {show(value)}")
    if len(items) > MAX_STOP_STRINGS:
        raise _invalid(name, f"{name} may have at most {MAX_STOP_STRINGS} strings")
    if any(len(v) > MAX_STOP_CHARS for v in items):
        raise _invalid(name, f"each {name} string may have at most {MAX_STOP_CHARS} characters")
    return tuple(_check_text(name, v) for v in items)


def _check_logit_bias(name: str, value: Any) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias}: ids as strings of digits (JSON keys) or integers, within
    uint32 here; the vocabulary and the [-100, 100] range are SamplingParams' checks."""
    if not isinstance(value, dict):
        raise _invalid(name, f"{name} must be an object of token id -> bias; got {show(value)}")
    out = []
    for key, bias in value.items():
        tid = key
        if isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 10:
            tid = int(key)
        if not _is_int(tid):
            raise _invalid(name, f"{name} keys must be token ids; got {show(key)}")
        tid = _check_wire_int(name, "uint32", tid)
        out.append((tid, _check_wire_value(name, "float", bias)))
    return tuple(sorted(out))


def _check_wire_int(name: str, kind: str, value: Any) -> int:
    if not _is_int(value):
        raise _invalid(name, f"{name} must be an integer; got {show(value)}")
    lo, hi = _INT_RANGES[kind]
    if not lo <= value <= hi:
        raise _invalid(name, f"{name} must be in [{lo}, {hi}] ({kind}); got {show(value)}")
    return int(value)


def _check_text(param: str, text: str) -> str:
    """Text must be valid Unicode: JSON can carry a lone surrogate (`"\\ud800"`), which no
    UTF-8 encoder (the tokenizer, protobuf) accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _invalid(param, f"{param} is not valid Unicode: {e.reason} at {e.start}") from e
    return text


def _tenant(raw: GenerateInput) -> str | None:
    """The authenticated tenant; with authentication off, a hash of whatever credential the
    caller sent (so callers that send different ones still don't share a cache)."""
    if raw.tenant:
        return raw.tenant
    if not raw.caller:
        return None
    return hashlib.sha256(raw.caller.encode(errors="surrogatepass")).hexdigest()[:32]


def tenant_salt(salt: str | None, tenant: str | None) -> str | None:
    """Tenants never share prefix-cache entries (`cached_tokens` and timing would leak).

    The server derives the tenant, so no caller can pick another's; a caller's own
    `cache_salt` only narrows it further.
    """
    if not tenant:
        return salt
    return f"{tenant}:{salt}" if salt else tenant


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _invalid(
    param: str | None, message: str, code: str = "invalid_value"
) -> RequestValidationError:
    return RequestValidationError(code, message, param)


def _empty(param: str) -> RequestValidationError:
    return RequestValidationError("empty_prompt", f"{param} must not be empty", param)
