"""Tool calling's parsing, rendering and output (router/tools.py), and structured-output fields
(router/structured.py), without a mesh: what each bad input is refused for, by name."""

from __future__ import annotations

import json

import pytest

from splitserve.router.errors import RequestValidationError
from splitserve.router.generation import GenerationDelta
from splitserve.router.openai_protocol import Accumulator, Formatter, parse_chat
from splitserve.router.structured import parse_guided
from splitserve.router.tools import (
    ToolFormatter,
    guided_for,
    parse_calls,
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
    assert first["choices"][0]["delta"] == {}  # held back
    last = fmt.chunk(GenerationDelta("id", [2], text[10:], finish_reason="stop"))["choices"][0]
    assert last["finish_reason"] == "tool_calls"
    (delta,) = last["delta"]["tool_calls"]
    assert delta["index"] == 0 and delta["function"]["name"] == "add"


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
