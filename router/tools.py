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

Output. The calls come back as `message.tool_calls` (`finish_reason: "tool_calls"`), with any
text outside them as `content`. Streamed, as OpenAI streams them: a call's first delta carries
its index, id, type and name once the name has been generated (and is one of the tools), the
next ones `{"index", "function": {"arguments": <fragment>}}` as the arguments are generated;
text that turns out to be no call streams as content. `ToolCallParser` does both, so the
fragments of a stream add up to exactly the non-streamed call. Over gRPC the calls come whole on
a choice's last message (`GenerateResponse.tool_calls`), parsed the same way.
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
_TAG_OPEN, _TAG_CLOSE = "<tool_call>", "</tool_call>"
_ARGUMENT_KEYS = ("arguments", "parameters")  # some models write the latter


@dataclass
class OutputDelta:
    """What a piece of a choice's output adds: content text, and `tool_calls` entries in the
    shape of OpenAI's stream deltas (a call's first entry has its id, type and name)."""

    content: str = ""
    tool_calls: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def merge(self, other: OutputDelta) -> OutputDelta:
        self.content += other.content
        for entry in other.tool_calls:
            self.add(entry["index"], entry)
        return self

    def add(self, index: int, entry: dict[str, Any]) -> None:
        last = self.tool_calls[-1] if self.tool_calls else None
        if last is not None and last["index"] == index:  # one entry per call per delta
            last["function"]["arguments"] += entry["function"]["arguments"]
        else:
            self.tool_calls.append(entry)


_TOOK, _REREAD, _REJECT, _STOP = range(4)


class _Value:
    """Where one JSON value ends, a character at a time (strings and nesting respected)."""

    GOES_ON, LAST, ENDED_BEFORE, BAD = range(4)

    def __init__(self) -> None:
        self.kind = ""  # "container" | "string" | "primitive"
        self.depth = 0
        self.in_string = False
        self.escaped = False

    def push(self, c: str) -> int:
        if not self.kind:
            if c in "{[":
                self.kind, self.depth = "container", 1
            elif c == '"':
                self.kind, self.in_string = "string", True
            elif c == "-" or c.isdigit() or c in "tfn":
                self.kind = "primitive"
            else:
                return self.BAD
            return self.GOES_ON
        if self.kind == "primitive":
            return self.GOES_ON if c.isalnum() or c in "+-." else self.ENDED_BEFORE
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif c == "\\":
                self.escaped = True
            elif c == '"':
                self.in_string = False
                if self.kind == "string":
                    return self.LAST
            return self.GOES_ON
        if c == '"':
            self.in_string = True
        elif c in "{[":
            self.depth += 1
        elif c in "}]":
            self.depth -= 1
            if self.depth == 0:
                return self.LAST
        return self.GOES_ON


class ToolCallParser:
    """A choice's output, fed as it is generated, split into content and tool calls.

        parser = ToolCallParser(req)
        for text in deltas:
            out = parser.feed(text)      # OutputDelta: content, tool_calls entries
        out = parser.close()             # the end of the output
        parser.calls                     # every call, whole (OpenAI's tool_calls shape)

    A call is a JSON object `{"name": ..., "arguments": ...}` (or "parameters") inside a
    `<tool_call>` block anywhere in the output, or bare at its start (the whole output under
    `required` / a named function). It becomes a call once its name is read and is one of the
    request's tools: from then on its arguments stream as they come, as the raw JSON text the
    model wrote (so a stream's fragments add up to exactly the non-streamed `arguments`; no
    arguments key: "{}"). Until then the candidate's text is held back, and whatever turns out
    not to be a call (an unknown name, not an object, not JSON) is content after all, exactly as
    written. Also held back: the end of the content while it could be the start of a
    `<tool_call>` tag, and trailing whitespace (dropped before a call, after one, and at the
    end of an output that made calls). A call the output ends inside (max_tokens) keeps the
    arguments it has, as OpenAI's do.
    """

    def __init__(self, req: ToolsRequest) -> None:
        self._names = {t.name for t in req.tools}
        self.calls: list[dict[str, Any]] = []
        self._buf = ""  # text not looked at yet, or not decided
        self._mode = "start"  # start | content | tag_open | object | tag_close
        self._ws = ""  # content's trailing whitespace, held
        self._after_call = False  # drop the whitespace that follows a call
        self._out = OutputDelta()
        self._reset_object("", tagged=False)

    # ---- public -----------------------------------------------------------------------------
    def feed(self, text: str) -> OutputDelta:
        self._buf += text
        while self._buf and self._step():
            pass
        return self._take()

    def close(self) -> OutputDelta:
        rest, self._buf = self._buf, ""
        if self._mode == "object" and self._started:
            self._end_call()
        elif self._mode in ("tag_open", "object"):
            self._content(self._held + rest)
        elif self._mode != "tag_close":
            self._content(rest)
        if not self.calls:
            self._out.content += self._ws
        self._ws = ""
        self._mode = "closed"
        return self._take()

    # ---- modes ------------------------------------------------------------------------------
    def _step(self) -> bool:
        """Moves on as far as the buffer allows; False: more text is needed."""
        if self._mode == "start":  # a bare call object may open the output
            body = self._buf.lstrip()
            if not body:
                return False
            if body[0] == "{":
                self._reset_object(self._buf[: len(self._buf) - len(body)], tagged=False)
                self._buf = body
                self._mode = "object"
            else:
                self._mode = "content"
            return True
        if self._mode == "content":
            return self._scan_content()
        if self._mode == "tag_open":
            body = self._buf.lstrip()
            self._held += self._buf[: len(self._buf) - len(body)]
            self._buf = body
            if not body:
                return False
            if body[0] == "{":
                self._mode = "object"
            else:
                self._fail()
            return True
        if self._mode == "tag_close":  # "</tool_call>" after the call's object, if it is there
            body = self._buf.lstrip()
            self._buf = body
            if len(body) < len(_TAG_CLOSE) and _TAG_CLOSE.startswith(body):
                return False  # empty, or the tag's start: wait
            if body.startswith(_TAG_CLOSE):
                self._buf = body[len(_TAG_CLOSE) :]
            self._mode = "content"
            return True
        return self._scan_object()

    def _scan_content(self) -> bool:
        at = self._buf.find(_TAG_OPEN)
        if at >= 0:
            self._content(self._buf[:at])
            self._reset_object(_TAG_OPEN, tagged=True)
            self._buf = self._buf[at + len(_TAG_OPEN) :]
            self._mode = "tag_open"
            return True
        keep = _partial_suffix(self._buf, _TAG_OPEN)
        self._content(self._buf[: len(self._buf) - keep])
        self._buf = self._buf[len(self._buf) - keep :]
        return False

    def _content(self, text: str) -> None:
        if self._after_call:
            text = text.lstrip()
            if not text:
                return
            self._after_call = False
        body = text.rstrip()
        if body:
            self._out.content += self._ws + body
            self._ws = text[len(body) :]
        else:
            self._ws += text

    # ---- the call object --------------------------------------------------------------------
    def _reset_object(self, held: str, tagged: bool) -> None:
        self._held = held  # the candidate's text so far: content again if it is no call
        self._tagged = tagged
        self._phase = "open"
        self._key = ""  # the current key's raw JSON, then its value's role
        self._value: _Value | None = None
        self._name_raw = ""
        self._args_pending = ""  # arguments read before the name
        self._args_seen = False
        self._started = False
        self._sink = ""  # "name" | "args" | "skip"

    def _scan_object(self) -> bool:
        buf, i = self._buf, 0
        while i < len(buf):
            took = self._object_char(buf[i])
            if took == _REREAD:  # a number ended just before this character: look again
                continue
            if took == _REJECT:  # the character can't go on the candidate: content again
                self._buf = buf[i:]
                self._fail()
                return True
            if took == _STOP:  # it did, and showed the candidate is no call
                self._buf = buf[i + 1 :]
                self._fail()
                return True
            i += 1
            if self._phase == "done":
                self._buf = buf[i:]
                self._end_call()
                return True
        self._buf = ""
        return False

    def _object_char(self, c: str) -> int:
        """Takes one character of the candidate object: _TOOK, _REREAD (a value ended before
        it; the object goes on), _REJECT (not the object's), _STOP (taken; no call after all)."""
        phase = self._phase
        if phase == "value_start" and not c.isspace():
            self._phase = "value"
            self._start_value()
        if self._phase == "value":
            return self._value_char(c)
        if phase == "key":
            self._key += c
            if c == '"' and _closes_string(self._key):
                self._phase = "colon"
        elif phase == "open":  # the "{" itself
            self._phase = "key_or_end"
        elif c.isspace():
            pass
        elif phase == "key_or_end" and c == '"':
            self._phase, self._key = "key", c
        elif phase in ("key_or_end", "after_value") and c == "}":
            if not self._started:
                return _REJECT
            self._phase = "done"
        elif phase == "colon" and c == ":":
            self._phase = "value_start"
        elif phase == "after_value" and c == ",":
            self._phase = "key_or_end"
        else:
            return _REJECT
        self._held += c
        return _TOOK

    def _key_name(self) -> str | None:
        try:
            key = json.loads(self._key)
        except ValueError:
            return None
        return key if isinstance(key, str) else None

    def _start_value(self) -> None:
        key = self._key_name()
        self._value = _Value()
        if key == "name" and not self._name_raw:
            self._sink = "name"
        elif key in _ARGUMENT_KEYS and not self._args_seen:
            self._sink, self._args_seen = "args", True
        else:
            self._sink = "skip"

    def _value_char(self, c: str) -> int:
        assert self._value is not None
        status = self._value.push(c)
        if status == _Value.BAD or (self._sink == "name" and self._value.kind != "string"):
            return _REJECT
        if status == _Value.ENDED_BEFORE:  # only numbers and literals: never the name
            self._phase = "after_value"
            return _REREAD
        self._held += c
        if self._sink == "name":
            self._name_raw += c
        elif self._sink == "args":
            if self._started:
                self._args(c)
            else:
                self._args_pending += c
        if status == _Value.LAST:
            self._phase = "after_value"
            if self._sink == "name" and not self._started:
                name = _loads(self._name_raw)
                if name not in self._names:
                    return _STOP
                self._start_call(name)
        return _TOOK

    # ---- calls ------------------------------------------------------------------------------
    def _start_call(self, name: str) -> None:
        self._started = True
        self._ws = ""  # whitespace before a call is no content
        index = len(self.calls)
        call_id = f"call_{uuid.uuid4().hex[:24]}"
        self.calls.append(
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
        )
        entry = {"index": index, "id": call_id, "type": "function"}
        self._out.add(index, {**entry, "function": {"name": name, "arguments": ""}})
        pending, self._args_pending = self._args_pending, ""
        if pending:
            self._args(pending)

    def _args(self, text: str) -> None:
        index = len(self.calls) - 1
        self.calls[index]["function"]["arguments"] += text
        self._out.add(index, {"index": index, "function": {"arguments": text}})

    def _end_call(self) -> None:
        if not self._args_seen:
            self._args("{}")
        self._mode = "tag_close" if self._tagged else "content"
        self._after_call = True
        self._reset_object("", tagged=False)

    def _fail(self) -> None:
        """The candidate is no call (or, once started, the call ends where its text stops
        making sense); what is left in the buffer is content again."""
        if self._started:
            self._end_call()
            self._mode = "content"
            return
        held = self._held
        self._reset_object("", tagged=False)
        self._mode = "content"
        self._content(held)

    def _take(self) -> OutputDelta:
        out, self._out = self._out, OutputDelta()
        return out


def _partial_suffix(text: str, tag: str) -> int:
    """How many of `text`'s last characters could be the start of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def _closes_string(raw: str) -> bool:
    """Whether the quote that ends `raw` (a JSON string being read) closes it: it does unless
    an odd run of backslashes comes before it."""
    body = raw[:-1]
    return (len(body) - len(body.rstrip("\\"))) % 2 == 0


def parse_output(text: str, req: ToolsRequest) -> tuple[str, list[dict[str, Any]]]:
    """A whole output's content and OpenAI `tool_calls` entries ([] when it holds none): what
    a stream of it adds up to."""
    parser = ToolCallParser(req)
    out = parser.feed(text).merge(parser.close())
    return out.content, parser.calls


def parse_calls(text: str, req: ToolsRequest) -> list[dict[str, Any]]:
    """OpenAI `tool_calls` entries found in the output; [] when it holds none."""
    return parse_output(text, req)[1]


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


class ToolFormatter:
    """Wraps an endpoint's Formatter for a chat request with tools: calls parsed out of each
    choice's text (ToolCallParser), in whole responses and in streams, where a call's
    arguments stream as fragments once its name is known, and content as content."""

    def __init__(self, inner: Any, req: ToolsRequest) -> None:
        self.inner = inner
        self.req = req
        self._parsers: dict[int, ToolCallParser] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def response(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        body = self.inner.response(*args, **kwargs)
        for choice in body["choices"]:
            message = choice["message"]
            content, calls = parse_output(message.get("content") or "", self.req)
            if calls:
                message["content"] = content or None
                message["tool_calls"] = calls
                choice["finish_reason"] = _finish(choice["finish_reason"])
        return body

    def chunk(self, delta: GenerationDelta) -> dict[str, Any]:
        index = delta.index
        parser = self._parsers.setdefault(index, ToolCallParser(self.req))
        out = parser.feed(delta.text)
        if delta.finish_reason is not None:
            out.merge(parser.close())
            del self._parsers[index]
        chunk = self.inner.chunk(dataclasses.replace(delta, text=out.content))
        choice = chunk["choices"][0]
        if out.tool_calls:
            choice["delta"]["tool_calls"] = out.tool_calls
        if delta.finish_reason is not None and parser.calls:
            choice["finish_reason"] = _finish(choice["finish_reason"])
        return chunk


def _finish(reason: str | None) -> str | None:
    """A choice that made calls ends with "tool_calls", unless it was cut off (length, abort)."""
    return "tool_calls" if reason == "stop" else reason


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
