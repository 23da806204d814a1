"""Tool calling's parsing, rendering and output (router/tools.py), and structured-output fields
(router/structured.py), without a mesh: what each bad input is refused for, by name."""

from __future__ import annotations

import json
import random

import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from splitserve.router.errors import RequestValidationError
from splitserve.router.generation import GenerationDelta
from splitserve.router.openai_protocol import Accumulator, Formatter, parse_chat
from splitserve.router.structured import parse_guided
from splitserve.router.tools import (
    ToolCallParser,
    ToolFormatter,
    guided_for,
    parse_calls,
    parse_output,
    parse_tools,
    render_messages,
)

TOOL = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Adds.",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}},
    },
}
OTHER = {"type": "function", "function": {"name": "noop"}}


@pytest.mark.parametrize(
    ("tools", "choice", "param"),
    [
        ([{"type": "function", "function": {"parameters": {}}}], None, "tools"),  # no name
        ([{"type": "function", "function": {"name": ""}}], None, "tools"),
        ([{"type": "function", "function": {"name": "a b"}}], None, "tools"),
        ([{"type": "function"}], None, "tools"),
        ([{"type": "retrieval", "function": {"name": "x"}}], None, "tools"),
        ("add", None, "tools"),
        ([TOOL, TOOL], None, "tools"),  # the same name twice
        ([{"type": "function", "function": {"name": "x", "parameters": []}}], None, "tools"),
        ([TOOL], "sometimes", "tool_choice"),
        ([TOOL], {"type": "function", "function": {"name": "missing"}}, "tool_choice"),
        ([TOOL], {"type": "function"}, "tool_choice"),
        (None, "required", "tool_choice"),
    ],
)
def test_bad_tools_name_their_param(tools: object, choice: object, param: str) -> None:
    with pytest.raises(RequestValidationError) as err:
        parse_tools(tools, choice)
    assert err.value.param == param and err.value.http_status == 400


def test_a_nameless_tool_is_a_400_from_the_chat_parser() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}
    with pytest.raises(RequestValidationError) as err:
        parse_chat(body, 10, None)
    assert err.value.param == "tools"
    body["tool_choice"] = "required"
    body["tools"] = [TOOL]
    body["response_format"] = {"type": "json_object"}
    with pytest.raises(RequestValidationError) as err:
        parse_chat(body, 10, None)
    assert err.value.param == "tool_choice"


def test_choices_constrain_the_call_to_valid_json() -> None:
    named = parse_tools([TOOL, OTHER], {"type": "function", "function": {"name": "add"}})
    assert named is not None and named.choice == "named"
    guided = guided_for(named)
    assert guided is not None and guided.param == "tool_choice"
    schema = json.loads(guided.spec.value)
    assert schema["properties"]["name"] == {"const": "add"}
    required = parse_tools([TOOL, OTHER], "required")
    assert required is not None
    both = json.loads(guided_for(required).spec.value)  # type: ignore[union-attr]
    assert [c["properties"]["name"]["const"] for c in both["anyOf"]] == ["add", "noop"]
    auto = parse_tools([TOOL], None)
    assert auto is not None and auto.choice == "auto" and guided_for(auto) is None
    none = parse_tools([TOOL], "none")
    assert none is not None and not none.active


def test_messages_with_calls_and_results_render_as_text() -> None:
    req = parse_tools([TOOL], "auto")
    messages = [
        {"role": "user", "content": "1+2?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "add", "arguments": '{"a":1}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "3"},
    ]
    out = render_messages(messages, req)
    assert out[0]["role"] == "system" and '"name": "add"' in out[0]["content"]
    assert out[2] == {
        "role": "assistant",
        "content": '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>',
    }
    assert out[3]["role"] == "tool" and out[3]["content"] == "3"
    # "none": the tools stay out of the prompt
    assert render_messages(messages, parse_tools([TOOL], "none"))[0]["role"] == "user"


def test_calls_are_parsed_back_in_openai_shape() -> None:
    auto = parse_tools([TOOL], "auto")
    assert auto is not None
    (call,) = parse_calls(
        'Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": 2}}\n</tool_call>', auto
    )
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "add", "arguments": '{"a": 2}'}
    assert parse_calls("just text", auto) == []
    assert parse_calls('{"name": "unknown", "arguments": {}}', auto) == []
    required = parse_tools([TOOL], "required")
    assert required is not None
    assert len(parse_calls('{"name": "add", "arguments": {"a": 1}}', required)) == 1


def test_the_formatter_turns_text_into_tool_calls_whole_and_streamed() -> None:
    req = parse_tools([TOOL], "required")
    assert req is not None
    text = '{"name": "add", "arguments": {"a": 5}}'
    fmt = ToolFormatter(Formatter(True, "id", "m", None), req)
    acc = Accumulator()
    acc.add(GenerationDelta("id", [1], text, finish_reason="stop"))
    choice = fmt.response(acc)["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]) == {"a": 5}
    fmt = ToolFormatter(Formatter(True, "id", "m", None), req)
    first = fmt.chunk(GenerationDelta("id", [1], text[:10]))
    assert first["choices"][0]["delta"] == {}  # held back: no name yet
    last = fmt.chunk(GenerationDelta("id", [2], text[10:], finish_reason="stop"))["choices"][0]
    assert last["finish_reason"] == "tool_calls"
    (delta,) = last["delta"]["tool_calls"]
    assert delta["index"] == 0 and delta["function"] == {"name": "add", "arguments": '{"a": 5}'}


# Outputs a model may write, each fed to the parser whole and in pieces of every size.
OUTPUTS = [
    'Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": 2}}\n</tool_call>',
    '{"name":"add","arguments":{"a":5}}',
    '  {"arguments": {"a": 1, "b": "x\\"}{"}, "name": "add"}',  # arguments first; } in a string
    '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>\n'
    '<tool_call>\n{"name": "noop"}\n</tool_call>\n',
    '<tool_call>{"name": "add", "arguments": {"a": 1',  # cut off by max_tokens
    '{"name": "a\\u0064d", "parameters": 5 }',
    # Not calls: content, exactly as written.
    "just text with { braces } and <tool stuff",
    '{"answer": 42, "x": [1, 2, {"y": "}"}]}',
    '{"name": "unknown", "arguments": {}} trailing',
    "text <tool_call> not json </tool_call> more",
    "\n\nHello\n\n",
    "ends with <tool_call",
    '{"name"',
]
EXPECTED = [
    ("Sure.", [("add", '{"a": 2}')]),
    ("", [("add", '{"a":5}')]),
    ("", [("add", '{"a": 1, "b": "x\\"}{"}')]),
    ("", [("add", '{"a": 1}'), ("noop", "{}")]),
    ("", [("add", '{"a": 1')]),
    ("", [("add", "5")]),
]


def _in_pieces(parser: ToolCallParser, text: str, rng: random.Random) -> tuple[str, list]:
    """Feeds `text` in random pieces; the content and the calls its deltas add up to, each
    call's entries checked to have OpenAI's stream shape."""
    pieces, i = [], 0
    while i < len(text):
        n = rng.randint(1, 4)
        pieces.append(text[i : i + n])
        i += n
    content, calls = "", {}
    for out in [*(parser.feed(p) for p in pieces), parser.close()]:
        content += out.content
        for entry in out.tool_calls:
            if entry["index"] not in calls:  # a call's first entry: id, type, name
                assert entry["type"] == "function" and entry["id"].startswith("call_")
                calls[entry["index"]] = [entry["function"]["name"], ""]
            else:
                assert set(entry) == {"index", "function"} and set(entry["function"]) == {
                    "arguments"
                }
            calls[entry["index"]][1] += entry["function"]["arguments"]
    return content, [tuple(calls[i]) for i in sorted(calls)]


@pytest.mark.parametrize("index", range(len(OUTPUTS)))
def test_calls_and_content_streamed_in_pieces_add_up_to_the_whole(index: int) -> None:
    text = OUTPUTS[index]
    req = parse_tools([TOOL, OTHER], "auto")
    assert req is not None
    content, calls = parse_output(text, req)
    whole = (content, [(c["function"]["name"], c["function"]["arguments"]) for c in calls])
    assert whole == (EXPECTED[index] if index < len(EXPECTED) else (text, []))
    rng = random.Random(index)
    for _ in range(50):
        assert _in_pieces(ToolCallParser(req), text, rng) == whole


def test_a_stream_sends_the_call_as_argument_fragments_the_openai_client_puts_together() -> None:
    """Token-sized deltas through the formatter: the name first (arguments ""), then the
    arguments in fragments; the openai package's ChatCompletionStreamState accumulates them
    into the non-streamed response's call. Text that is no call streams as content."""
    req = parse_tools([TOOL, OTHER], {"type": "function", "function": {"name": "add"}})
    assert req is not None
    tokens = ['{"', "name", '":"', "add", '","', "arguments", '":{"', "a", '":', "12", "}}"]
    text = "".join(tokens)
    acc = Accumulator()
    acc.add(GenerationDelta("id", [1], text, finish_reason="stop"))
    whole = ToolFormatter(Formatter(True, "id", "m", None), req).response(acc)["choices"][0]
    (call,) = whole["message"]["tool_calls"]
    assert call["function"] == {"name": "add", "arguments": '{"a":12}'}

    fmt = ToolFormatter(Formatter(True, "id", "m", None), req)
    chunks = [fmt.first_chunk(0)]
    for i, token in enumerate(tokens):
        finish = "stop" if i == len(tokens) - 1 else None
        chunks.append(fmt.chunk(GenerationDelta("id", [i], token, finish_reason=finish)))
    entries = [e for c in chunks for e in c["choices"][0]["delta"].get("tool_calls", [])]
    assert entries[0]["function"] == {"name": "add", "arguments": ""}  # once "add" closed
    assert entries[0]["id"] and entries[0]["type"] == "function"
    fragments = [e["function"]["arguments"] for e in entries[1:]]
    assert all(set(e) == {"index", "function"} for e in entries[1:])
    assert len(fragments) >= 4 and "".join(fragments) == '{"a":12}'
    state = ChatCompletionStreamState(input_tools=[TOOL, OTHER])
    for chunk in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    final = state.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls" and not final.message.content
    (streamed,) = final.message.tool_calls
    assert (streamed.function.name, streamed.function.arguments) == ("add", '{"a":12}')

    # Not a call (auto, an unknown name): every character comes back as content.
    auto = parse_tools([TOOL], "auto")
    assert auto is not None
    fmt = ToolFormatter(Formatter(True, "id", "m", None), auto)
    text = '{"name": "other", "x": 1} and <tool_ca'
    out = [fmt.chunk(GenerationDelta("id", [i], ch)) for i, ch in enumerate(text)]
    out.append(fmt.chunk(GenerationDelta("id", [99], "", finish_reason="stop")))
    deltas = [c["choices"][0]["delta"] for c in out]
    assert "".join(d.get("content", "") for d in deltas) == text
    assert not any("tool_calls" in d for d in deltas)
    assert out[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "a b"}}},
            "response_format",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": 1}}},
            "response_format",
        ),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"guided_json": 5}, "guided_json"),
        ({"guided_regex": ["a"]}, "guided_regex"),
        ({"guided_choice": "a"}, "guided_choice"),
        ({"guided_choice": ["a", 1]}, "guided_choice"),
        ({"guided_json": {}, "guided_choice": ["a"]}, "guided_choice"),
    ],
)
def test_bad_structured_output_fields_name_their_param(body: dict, param: str) -> None:
    with pytest.raises(RequestValidationError) as err:
        parse_guided(body)
    assert err.value.param == param


def test_strict_closes_objects_and_text_means_free() -> None:
    assert parse_guided({"response_format": {"type": "text"}}) is None
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    guided = parse_guided({"response_format": rf})
    assert guided is not None and guided.spec.kind == "json_schema"
    assert json.loads(guided.spec.value)["additionalProperties"] is False
    loose = parse_guided(
        {"response_format": {**rf, "json_schema": {"name": "x", "schema": schema}}}
    )
    assert loose is not None and "additionalProperties" not in json.loads(loose.spec.value)
