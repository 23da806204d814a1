"""Tool calling on chat completions: OpenAI's `tools` / `tool_choice` in, `tool_calls` out.

Rendering. SmolLM2's chat template (like most small models') has no notion of tools, so the
router renders them itself, the same for every model: a system turn that lists the tools' JSON
definitions and the call format (Hermes style, which Qwen/SmolLM-family models have seen):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

An assistant turn that called tools is rendered as those blocks, and a `tool` turn (a tool's
result) as its content under the template's "tool" role. (A template that takes `tools`
itself is not used for them yet.)

Constraining. `tool_choice: "required"` and a named function go through structured outputs: the
output must be the call itself as JSON, `{"name": ..., "arguments": {...}}`, with the name one
of the tools (or the named one) and the arguments matching that tool's `parameters` schema
(closed: no properties beyond the ones it names, as OpenAI's strict mode); so the call always
parses. `"auto"` leaves the output free and parses `<tool_call>` blocks (or a
bare call object) out of it; `"none"` leaves tools out of the prompt entirely.

Output. The calls come back as `message.tool_calls` (`finish_reason: "tool_calls"`); streamed,
the text of a request with tools is held back and the calls (or the text, if it held none)
come as one delta at the end, each call with its index, id, name and whole arguments.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from splitserve.engine.guided import GuidedSpec, closed_schema

from .errors import RequestValidationError, show
from .generation import GenerationDelta
from .structured import GuidedInput

MAX_TOOLS = 128
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]

    def definition(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "parameters": self.parameters}


@dataclass(frozen=True)
class ToolsRequest:
    tools: tuple[Tool, ...]
    choice: str  # "auto" | "none" | "required" | "named"
    named: str | None = None

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    @property
    def constrained(self) -> bool:
        return self.choice in ("required", "named")


# ---- requests -----------------------------------------------------------------------------
def parse_tools(tools: Any, tool_choice: Any) -> ToolsRequest | None:
    """`tools` and `tool_choice` of a request, checked (400 naming `tools` / `tool_choice`)."""
    if tools is None and tool_choice is None:
        return None
    parsed = tuple(_tool(i, t) for i, t in enumerate(_tool_list(tools)))
    names = [t.name for t in parsed]
    if len(set(names)) != len(names):
        raise _invalid("tools", "tools must have distinct function names")
    if tool_choice is None:
        return ToolsRequest(parsed, "auto" if parsed else "none")
    if tool_choice in ("auto", "none", "required"):
        if tool_choice == "required" and not parsed:
            raise _invalid("tool_choice", 'tool_choice "required" needs tools')
        return ToolsRequest(parsed, tool_choice)
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(fn, dict) or tool_choice.get("type", "function") != "function":
        raise _invalid(
            "tool_choice",
            'tool_choice must be "auto", "none", "required" or '
            '{"type": "function", "function": {"name": ...}}',
        )
    if not isinstance(name, str) or name not in names:
        raise _invalid("tool_choice", f"tool_choice names no tool of this request: {show(name)}")
    return ToolsRequest(parsed, "named", name)


def _tool_list(tools: Any) -> list[Any]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise _invalid("tools", "tools must be a list of {type: function, function: {...}}")
    if len(tools) > MAX_TOOLS:
        raise _invalid("tools", f"at most {MAX_TOOLS} tools; got {len(tools)}")
    return tools


def _tool(index: int, tool: Any) -> Tool:
    where = f"tools[{index}]"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise _invalid("tools", f'{where} must be {{"type": "function", "function": {{...}}}}')
    fn = tool.get("function")
    if not isinstance(fn, dict):
        raise _invalid("tools", f"{where}.function must be an object with a name")
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise _invalid("tools", f"{where}.function.name must be 1-64 of a-z A-Z 0-9 _ -")
    description = fn.get("description") or ""
    if not isinstance(description, str):
        raise _invalid("tools", f"{where}.function.description must be a string")
    params = fn.get("parameters")
    if params is None:
        params = _EMPTY_PARAMETERS
    if not isinstance(params, dict):
        raise _invalid("tools", f"{where}.function.parameters must be a JSON schema object")
    return Tool(name, description, params)


def apply_tools(raw: Any, tools: Any, tool_choice: Any) -> ToolsRequest | None:
    """A chat request's tools, applied to its validator input (`GenerateInput`): the messages
    rendered, and for required / named the call's grammar (not with another structured-output
    field: 400 naming tool_choice)."""
    req = parse_tools(tools, tool_choice)
    raw.messages = render_messages(raw.messages, req)
    guided = guided_for(req) if req is not None else None
    if guided is not None:
        if raw.guided is not None:
            raise _invalid("tool_choice", f"tool_choice {req.choice!r} can't be combined with "
                           f"{raw.guided.param}")  # fmt: skip
        raw.guided = guided
    return req


def guided_for(req: ToolsRequest) -> GuidedInput | None:
    """required / named: the output is one call, as JSON, valid for its tool."""
    if not req.constrained:
        return None
    tools = [t for t in req.tools if req.choice == "required" or t.name == req.named]
    calls = [
        {
            "type": "object",
            # Closed (no properties beyond the tool's): what OpenAI's strict function calling
            # does, and a small model otherwise invents keys until max_tokens.
            "properties": {"name": {"const": t.name}, "arguments": closed_schema(t.parameters)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return GuidedInput(GuidedSpec("json_schema", json.dumps(schema)), "tool_choice")


def render_messages(messages: Any, req: ToolsRequest | None) -> Any:
    """Messages the chat template can render: tool calls and tool results as text, the tools'
    system turn first. Anything malformed is left for the validator to name."""
    if not isinstance(messages, list):
        return messages
    out = [_render_message(i, m) for i, m in enumerate(messages)]
    if req is None or not req.active:
        return out
    prompt = _system_prompt(req)
    if out and isinstance(out[0], dict) and out[0].get("role") in ("system", "developer"):
        first = dict(out[0])
        content = first.get("content")
        first["content"] = f"{content}\n\n{prompt}" if isinstance(content, str) else prompt
        return [first, *out[1:]]
    return [{"role": "system", "content": prompt}, *out]


def _render_message(index: int, m: Any) -> Any:
    if not isinstance(m, dict) or "tool_calls" not in m:
        return m
    calls = m.get("tool_calls") or []
    param = f"messages[{index}].tool_calls"
    if not isinstance(calls, list):
        raise _invalid(param, f"{param} must be a list of calls")
    blocks = []
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _invalid(param, f"{param}: each call needs a function with a name")
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            args = _loads(args) if _loads(args) is not None else args  # else shown as text
        blocks.append(_call_text(fn["name"], args))
    content = m.get("content") if isinstance(m.get("content"), str) else ""
    rendered = {k: v for k, v in m.items() if k in ("role", "content")}
    rendered["content"] = "\n".join([content, *blocks] if content else blocks)
    return rendered


def _call_text(name: str, arguments: Any) -> str:
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"


def _system_prompt(req: ToolsRequest) -> str:
    tools = "\n".join(json.dumps(t.definition(), ensure_ascii=False) for t in req.tools)
    how = (
        "To call a function, reply with only the call, as JSON: "
        '{"name": <function name>, "arguments": <arguments object>}.'
        if req.constrained
        else "To call a function, reply with:\n<tool_call>\n"
        '{"name": <function name>, "arguments": <arguments object>}\n</tool_call>\n'
        "Otherwise answer normally."
    )
    return f"You can call these functions:\n<tools>\n{tools}\n</tools>\n{how}"


# ---- responses ----------------------------------------------------------------------------
def parse_calls(text: str, req: ToolsRequest) -> list[dict[str, Any]]:
    """OpenAI `tool_calls` entries found in the output; [] when it holds none."""
    names = {t.name for t in req.tools}
    found: list[Any] = []
    if req.constrained:
        found = [_loads(text)]
    else:
        found = [_loads(b) for b in _CALL_BLOCK.findall(text)]
        if not found:
            found = [_loads(text.strip())]
    calls = []
    for obj in found:
        if not isinstance(obj, dict) or obj.get("name") not in names:
            continue
        args = json.dumps(obj.get("arguments", obj.get("parameters", {})), ensure_ascii=False)
        calls.append(
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": obj["name"], "arguments": args},
            }
        )
    return calls


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


class ToolFormatter:
    """Wraps an endpoint's Formatter for a chat request with tools: calls parsed out of each
    choice's text, in whole responses and in streams (the text held back until the end)."""

    def __init__(self, inner: Any, req: ToolsRequest) -> None:
        self.inner = inner
        self.req = req
        self._texts: dict[int, str] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def response(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        body = self.inner.response(*args, **kwargs)
        for choice in body["choices"]:
            message = choice["message"]
            calls = parse_calls(message.get("content") or "", self.req)
            if calls:
                message["content"] = None
                message["tool_calls"] = calls
                choice["finish_reason"] = "tool_calls"
        return body

    def chunk(self, delta: GenerationDelta) -> dict[str, Any]:
        index = getattr(delta, "index", 0)
        self._texts[index] = self._texts.get(index, "") + delta.text
        finish = delta.finish_reason
        out = self.inner.chunk(dataclasses.replace(delta, text=""))
        if finish is None:
            return out
        text = self._texts.pop(index, "")
        calls = parse_calls(text, self.req)
        choice = out["choices"][0]
        if calls:
            choice["delta"] = {
                "tool_calls": [{"index": i, **c} for i, c in enumerate(calls)],
            }
            choice["finish_reason"] = "tool_calls"
        elif text:
            choice["delta"] = {"content": text}
        return out


def with_tools(formatter: Any, req: ToolsRequest | None) -> Any:
    return ToolFormatter(formatter, req) if req is not None and req.active else formatter


def _invalid(param: str, message: str) -> RequestValidationError:
    return RequestValidationError("invalid_value", message, param)


# ---- gRPC ---------------------------------------------------------------------------------
def apply_grpc_tools(raw: Any, request: Any) -> ToolsRequest | None:
    """GenerateRequest's chat tool fields (tool_calls on messages, tools_json,
    tool_choice_json) applied to its validator input, as `apply_tools` does for HTTP."""
    if request.WhichOneof("input") != "chat":
        if request.tools_json or request.tool_choice_json:
            raise _invalid("tools", "tools need chat messages")
        return None
    messages = []
    for m in request.chat.messages:
        msg: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            msg["tool_calls"] = [
                {"id": c.id, "function": {"name": c.name, "arguments": c.arguments}}
                for c in m.tool_calls
            ]
        messages.append(msg)
    raw.messages = messages
    tools = _json_field(request.tools_json, "tools")
    choice = _json_field(request.tool_choice_json, "tool_choice")
    return apply_tools(raw, tools, choice)


def _json_field(text: str, param: str) -> Any:
    if not text:
        return None
    if text in ("auto", "none", "required"):  # tool_choice's words, bare or as JSON strings
        return text
    value = _loads(text)
    if value is None:
        raise _invalid(param, f"{param}_json must be JSON text")
    return value


class GrpcToolCalls:
    """Collects a chat stream's text and puts the parsed calls on its last message."""

    def __init__(self, req: ToolsRequest | None) -> None:
        self.req = req if req is not None and req.active else None
        self._texts: dict[int, str] = {}

    def add(self, response: Any, delta: GenerationDelta) -> Any:
        if self.req is None:
            return response
        index = getattr(delta, "index", 0)
        self._texts[index] = self._texts.get(index, "") + delta.text
        if delta.finish_reason is not None:
            for call in parse_calls(self._texts.pop(index, ""), self.req):
                fn = call["function"]
                tc = response.tool_calls.add()
                tc.id, tc.name, tc.arguments = call["id"], fn["name"], fn["arguments"]
        return response
