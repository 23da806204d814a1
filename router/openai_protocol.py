"""OpenAI's JSON shapes: request bodies -> `GenerateInput`, deltas -> responses and chunks.

Only parsing and formatting live here; every value check is the shared validator's. Fields
this server can't honour (suffix, tools, ...) are rejected by name rather than silently ignored.
A completions request may carry a list of prompts (strings or token-id lists); `n`, `best_of`
and the prompts become choices (router/choices.py), each formatted by its `index`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import RequestValidationError
from .generation import GenerationDelta, LogprobInfo, UsageInfo
from .structured import parse_guided
from .tools import apply_tools
from .validation import GenerateInput, check_prompt_list

# Body field -> SamplingParams field, shared by both endpoints.
_SAMPLING_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "repetition_penalty": "repetition_penalty",
    "seed": "seed",
    "stop": "stop",
    "stop_token_ids": "stop_token_ids",
    "ignore_eos": "ignore_eos",
    "min_tokens": "min_tokens",
    "logit_bias": "logit_bias",
}
_UNSUPPORTED = {
    "suffix": "suffix is not supported",
    "tools": "tools are not supported",
    "functions": "functions are not supported",
    "audio": "audio output is not supported",
}


@dataclass(frozen=True)
class StreamOptions:
    stream: bool = False
    include_usage: bool = False


@dataclass(frozen=True)
class ParsedRequest:
    raw: GenerateInput
    stream: StreamOptions
    top_logprobs: int | None = None  # chat: how many alternatives to show
    prompts: list[Any] | None = None  # completions with a list of prompts: each one's input
    tools: Any = None  # chat: router/tools.py ToolsRequest, when the request has tools

    def inputs(self) -> list[GenerateInput]:
        """One validator input per prompt."""
        if self.prompts is None:
            return [self.raw]
        out = []
        for prompt in self.prompts:
            raw = replace(self.raw, sampling=dict(self.raw.sampling))
            _set_one_prompt(raw, prompt)
            out.append(raw)
        return out


def parse_completion(body: dict[str, Any], body_bytes: int, caller: str | None) -> ParsedRequest:
    _reject_unsupported(body)
    raw = _common(body, body_bytes, caller, prefix="cmpl")
    raw.guided = parse_guided(body)
    raw.best_of = body.get("best_of")
    raw.echo = body.get("echo", False)
    raw.sampling["max_tokens"] = body.get("max_tokens")
    if body.get("logprobs") is not None:
        raw.sampling["logprobs"] = body["logprobs"]
        if raw.echo is True:  # the prompt's logprobs too, with as many alternatives
            raw.sampling["prompt_logprobs"] = body["logprobs"]
    prompts = _set_prompt(raw, body.get("prompt"))
    return ParsedRequest(raw, _stream_options(body), prompts=prompts)


def parse_chat(body: dict[str, Any], body_bytes: int, caller: str | None) -> ParsedRequest:
    _reject_unsupported({k: v for k, v in body.items() if k != "tools"})  # chat takes tools
    raw = _common(body, body_bytes, caller, prefix="chatcmpl")
    raw.guided = parse_guided(body)
    raw.echo = body.get("echo", False)  # the validator refuses it for chat, by name
    raw.default_max_tokens = None  # chat goes on until the model stops or the context ends
    max_tokens = body.get("max_completion_tokens")
    raw.sampling["max_tokens"] = max_tokens if max_tokens is not None else body.get("max_tokens")
    raw.messages = body.get("messages")
    tools = apply_tools(raw, body.get("tools"), body.get("tool_choice"))
    top = _chat_logprobs(body)
    if top is not None:
        raw.sampling["logprobs"] = top
    return ParsedRequest(raw, _stream_options(body), top, tools=tools)


def _common(
    body: dict[str, Any], body_bytes: int, caller: str | None, prefix: str
) -> GenerateInput:
    return GenerateInput(
        model=body.get("model"),
        n=body.get("n", 1),
        request_id=f"{prefix}-{uuid.uuid4().hex}",
        cache_salt=body.get("cache_salt"),  # vLLM's extension
        caller=caller,
        sampling={k: body[b] for b, k in _SAMPLING_FIELDS.items() if body.get(b) is not None},
        body_bytes=body_bytes,
    )


def _set_prompt(raw: GenerateInput, prompt: Any) -> list[Any] | None:
    """A string or token ids, or a list of either: then the list (a list of one is unwrapped)."""
    if prompt is None:
        raise _invalid("prompt", "prompt is required")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        prompt = check_prompt_list(prompt, "prompt")
        if len(prompt) > 1:
            _set_one_prompt(raw, prompt[0])
            return list(prompt)
        prompt = prompt[0]
    _set_one_prompt(raw, prompt)
    return None


def _set_one_prompt(raw: GenerateInput, prompt: Any) -> None:
    raw.prompt = raw.prompt_token_ids = None
    if isinstance(prompt, list):
        raw.prompt_token_ids = prompt
    else:
        raw.prompt = prompt


def _chat_logprobs(body: dict[str, Any]) -> int | None:
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if logprobs not in (None, True, False):
        raise _invalid("logprobs", "logprobs must be true or false for chat completions")
    if not logprobs:
        if top is not None:
            raise _invalid("top_logprobs", "top_logprobs needs logprobs: true")
        return None
    return 0 if top is None else top  # the validator checks the range


def _stream_options(body: dict[str, Any]) -> StreamOptions:
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _invalid("stream", "stream must be true or false")
    opts = body.get("stream_options")
    if opts is None:
        opts = {}
    if not isinstance(opts, dict):
        raise _invalid("stream_options", "stream_options must be an object")
    include_usage = opts.get("include_usage", False)
    if include_usage is None:
        include_usage = False
    if not isinstance(include_usage, bool):
        raise _invalid("stream_options", "stream_options.include_usage must be true or false")
    return StreamOptions(stream, include_usage and stream)


def _reject_unsupported(body: dict[str, Any]) -> None:
    for name, message in _UNSUPPORTED.items():
        if body.get(name):
            raise _invalid(name, message, "unsupported_parameter")


def _invalid(param: str, message: str, code: str = "invalid_value") -> RequestValidationError:
    return RequestValidationError(code, message, param)


# ---- responses ----------------------------------------------------------------------------


@dataclass
class Accumulator:
    """Collects a request's deltas for a non-streaming response."""

    text: str = ""
    logprobs: list[LogprobInfo] = field(default_factory=list)
    finish_reason: str | None = None
    usage: UsageInfo | None = None
    index: int = 0

    def add(self, delta: GenerationDelta) -> None:
        self.text += delta.prompt_text + delta.text  # echo: the prompt comes first
        self.logprobs += delta.prompt_logprobs + delta.logprobs
        self.finish_reason = delta.finish_reason or self.finish_reason
        self.usage = delta.usage or self.usage


def usage_json(usage: UsageInfo | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


class Formatter:
    """Builds one endpoint's JSON objects for one request."""

    def __init__(self, chat: bool, request_id: str, model: str, top_logprobs: int | None) -> None:
        self.chat = chat
        self.id = request_id
        self.model = model
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"
        self.top_logprobs = top_logprobs
        self.text_offsets: dict[int, int] = {}  # completions logprobs: per choice

    def response(
        self, accs: Accumulator | list[Accumulator], usage: UsageInfo | None = None
    ) -> dict[str, Any]:
        """The whole response: one choice per accumulator (`index` order); `usage`: the
        request's (default: the one accumulator's)."""
        if isinstance(accs, Accumulator):
            usage, accs = usage or accs.usage, [accs]
        choices = []
        for acc in sorted(accs, key=lambda a: a.index):
            choice: dict[str, Any] = {"index": acc.index, "finish_reason": acc.finish_reason}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": acc.text}
            else:
                choice["text"] = acc.text
            choice["logprobs"] = self._logprobs(acc.logprobs, acc.index)
            choices.append(choice)
        return self._envelope(self.object, choices, usage_json(usage))

    def first_chunk(self, index: int = 0) -> dict[str, Any] | None:
        """Chat streams open with the assistant's role (per choice), as OpenAI's do."""
        if not self.chat:
            return None
        delta = {"role": "assistant", "content": ""}
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
        return self._envelope(self.chunk_object, [choice], None)

    def chunk(self, delta: GenerationDelta) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": delta.index, "finish_reason": delta.finish_reason}
        if self.chat:
            choice["delta"] = {"content": delta.text} if delta.text else {}
        else:
            choice["text"] = delta.prompt_text + delta.text  # echo: the prompt first
        choice["logprobs"] = self._logprobs(delta.prompt_logprobs + delta.logprobs, delta.index)
        return self._envelope(self.chunk_object, [choice], None)

    def usage_chunk(self, usage: UsageInfo | None) -> dict[str, Any]:
        return self._envelope(self.chunk_object, [], usage_json(usage))

    def _envelope(
        self, obj: str, choices: list[dict[str, Any]], usage: dict[str, Any] | None
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage,
        }

    def _logprobs(self, items: list[LogprobInfo], index: int = 0) -> dict[str, Any] | None:
        if not items:
            return None
        if self.chat:
            return {"content": [self._chat_logprob(lp) for lp in items]}
        offsets = []
        offset = self.text_offsets.get(index, 0)
        for lp in items:
            offsets.append(offset)
            offset += len(lp.token)
        self.text_offsets[index] = offset
        return {
            "tokens": [lp.token for lp in items],
            "token_logprobs": [lp.logprob for lp in items],
            # The prompt's first token has no logprob and no alternatives: null, as OpenAI's.
            "top_logprobs": [
                None if lp.logprob is None else {t.token: t.logprob for t in lp.top} for lp in items
            ],
            "text_offset": offsets,
        }

    def _chat_logprob(self, lp: LogprobInfo) -> dict[str, Any]:
        top = [
            {"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode())}
            for t in lp.top[: self.top_logprobs or 0]
        ]
        return {
            "token": lp.token,
            "logprob": lp.logprob,
            "bytes": list(lp.token.encode()),
            "top_logprobs": top,
        }
