"""Structured outputs at the front doors: OpenAI's `response_format`, vLLM's `guided_*`, and the
proto's `guided` fields, each turned into one `GuidedSpec` (engine/guided.py) that travels with
the request to every worker that serves it.

    response_format {"type": "text"}                          free text
    response_format {"type": "json_object"}                   any JSON object
    response_format {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}
    guided_json (a schema, object or JSON text), guided_regex, guided_choice (strings)

At most one of them. The router compiles the spec before anything is tokenized or sent (on a
thread: the first compile builds the tokenizer view, about a second), so a malformed schema, a
regex that doesn't parse or can never match, a spec over the limits or an empty choice list
is a 400 naming the field it came from (INVALID_ARGUMENT over gRPC), and the server goes on.
`strict: true` closes every object that doesn't say otherwise (additionalProperties false).
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import Any

from splitserve.engine.guided import (
    GrammarCompiler,
    GuidedSpec,
    GuidedSpecError,
    closed_schema,
    spec_from_proto,
)
from splitserve.engine.tokenizer import Tokenizer

from .errors import RequestValidationError, show

# OpenAI's rule for a response_format / function name.
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice")


@dataclass(frozen=True)
class GuidedInput:
    """A spec as a front door parsed it, and the request field it came from (for errors)."""

    spec: GuidedSpec
    param: str


def parse_guided(body: dict[str, Any]) -> GuidedInput | None:
    """The structured-output fields of an HTTP body (chat or completions), or None."""
    found = [
        g
        for g in (
            _response_format(body.get("response_format")),
            *(_vllm_field(name, body.get(name)) for name in _GUIDED_FIELDS),
        )
        if g is not None
    ]
    if len(found) > 1:
        params = ", ".join(g.param for g in found)
        raise _invalid(found[1].param, f"give at most one structured-output field; got {params}")
    return found[0] if found else None


def _response_format(value: Any) -> GuidedInput | None:
    param = "response_format"
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise _invalid(param, 'response_format must be an object like {"type": "json_object"}')
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return GuidedInput(GuidedSpec("json_object"), param)
    if kind != "json_schema":
        raise _invalid(
            param,
            f"response_format.type must be text, json_object or json_schema; got {show(kind)}",
        )
    js = value.get("json_schema")
    if not isinstance(js, dict):
        raise _invalid(param, "response_format.json_schema must be an object with a name")
    name, schema, strict = js.get("name"), js.get("schema"), js.get("strict")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise _invalid(param, "response_format.json_schema.name must be 1-64 of a-z A-Z 0-9 _ -")
    if strict is not None and not isinstance(strict, bool):
        raise _invalid(param, "response_format.json_schema.strict must be true or false")
    if schema is None:
        return GuidedInput(GuidedSpec("json_object"), param)
    if not isinstance(schema, dict):
        raise _invalid(param, "response_format.json_schema.schema must be a JSON schema object")
    if strict:
        schema = closed_schema(schema)
    return GuidedInput(GuidedSpec("json_schema", _dumps(schema, param)), param)


def _vllm_field(name: str, value: Any) -> GuidedInput | None:
    if value is None:
        return None
    if name == "guided_json":
        if isinstance(value, str):
            return GuidedInput(GuidedSpec("json_schema", value), name)
        if not isinstance(value, dict):
            raise _invalid(name, "guided_json must be a JSON schema (an object or its JSON text)")
        return GuidedInput(GuidedSpec("json_schema", _dumps(value, name)), name)
    if name == "guided_regex":
        if not isinstance(value, str):
            raise _invalid(name, f"guided_regex must be a string; got {show(value)}")
        return GuidedInput(GuidedSpec("regex", value), name)
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise _invalid(name, "guided_choice must be a list of strings")
    return GuidedInput(GuidedSpec("choice", choices=tuple(value)), name)


def guided_from_proto(sampling: Any) -> GuidedInput | None:
    """The gRPC request's `SamplingOptions.guided`, or None."""
    which = sampling.WhichOneof("guided")
    if which is None:
        return None
    param = f"sampling.{which}"
    try:
        spec = spec_from_proto(sampling)
    except GuidedSpecError as e:
        raise _invalid(param, f"{param}: {e}") from e
    return None if spec is None else GuidedInput(spec, param)


class GuidedChecker:
    """Compiles each request's spec once at the router (the workers compile their own)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.compiler = GrammarCompiler(tokenizer, vocab_size, tokenizer.eos_token_ids)

    async def check(self, guided: GuidedInput) -> GuidedSpec:
        try:
            guided.spec.check_shape()  # cheap limits first, on the event loop
            await asyncio.to_thread(self.compiler.check, guided.spec)
        except GuidedSpecError as e:
            raise _invalid(guided.param, f"{guided.param}: {e}") from e
        return guided.spec


def _dumps(schema: Any, param: str) -> str:
    try:
        return json.dumps(schema, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError) as e:  # not reachable from parsed JSON
        raise _invalid(param, f"{param} is not a JSON schema: {e}") from e


def _invalid(param: str, message: str) -> RequestValidationError:
    return RequestValidationError("invalid_value", message, param)
