"""Structured outputs through the real disaggregated mesh on SmolLM2, with unchanged clients.

The official `openai` package's `chat.completions.parse` with pydantic models (half of the 20 in
bench/structured_schemas.py, run at once so the decode worker batches them); vLLM's
guided_regex / guided_choice and `json_object` over HTTP; the proto's guided fields over gRPC,
forced through prefill -> decode (the first token is sampled under the grammar on the prefill
worker, the rest on the decode worker from a matcher rebuilt from it) next to a free request
whose greedy output must not change; and bad specs: 400 naming the field / INVALID_ARGUMENT,
after which the mesh still serves and holds nothing.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import grpc
import jsonschema
import openai
import pytest
from mesh_fixtures import RPC_TIMEOUT_S, RunningMesh, assert_idle, stream_ids
from openai.lib._parsing._completions import type_to_response_format_param
from test_bad_input_e2e import check_error_body

from splitserve.bench.structured_schemas import SCHEMAS, Person, prompt_for
from splitserve.v1 import pb

pytestmark = pytest.mark.slow

# CI parses every other model of SCHEMAS (10 of 20, about half the time);
# bench/structured_clients.py runs all 20 against any endpoint.
CI_SCHEMAS = SCHEMAS[::2]
MAX_TOKENS = 160


def _model(mesh: RunningMesh) -> str:
    return mesh.openai().models.list().data[0].id


def test_openai_parse_returns_valid_objects_for_every_schema(disagg_mesh: RunningMesh) -> None:
    client, model = disagg_mesh.openai(), _model(disagg_mesh)

    def parse(cls: type) -> object:
        reply = client.chat.completions.parse(
            model=model,
            messages=[{"role": "user", "content": prompt_for(cls)}],
            response_format=cls,
            temperature=0,
            max_tokens=MAX_TOKENS,
        )
        message = reply.choices[0].message
        assert reply.choices[0].finish_reason == "stop", message.content
        return message.parsed

    # The first on this thread: the openai client builds its generic ParsedChatCompletion model
    # lazily, and pydantic's rebuild is not thread-safe (two threads at once failed a CI run
    # with "ParsedChatCompletion[~ResponseFormatT] has no attribute __pydantic_core_schema__").
    first, *rest = CI_SCHEMAS
    parsed = [parse(first)]
    with ThreadPoolExecutor(max(1, len(rest))) as pool:
        parsed += pool.map(parse, rest)
    for cls, obj in zip(CI_SCHEMAS, parsed, strict=True):
        assert isinstance(obj, cls), (cls.__name__, obj)


def test_regex_choice_and_json_object_over_http(disagg_mesh: RunningMesh) -> None:
    client, model = disagg_mesh.openai(), _model(disagg_mesh)
    out = client.completions.create(
        model=model,
        prompt="The date today is",
        max_tokens=20,
        temperature=0,
        extra_body={"guided_regex": r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"},
    )
    assert re.fullmatch(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", out.choices[0].text)
    assert out.choices[0].finish_reason == "stop"
    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Is the sky blue? Answer yes or no."}],
        max_tokens=5,
        temperature=0,
        extra_body={"guided_choice": ["yes", "no"]},
    )
    assert chat.choices[0].message.content in ("yes", "no")
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt_for(Person)}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        response_format=type_to_response_format_param(Person),
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    Person.model_validate_json(text)
    # Any object: a small model may nest forever, so the object is checked only if it ended.
    obj = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Describe a cat as a JSON object."}],
        max_tokens=40,
        temperature=0,
        response_format={"type": "json_object"},
    ).choices[0]
    assert obj.message.content.startswith("{")
    if obj.finish_reason == "stop":
        assert isinstance(json.loads(obj.message.content), dict)


def test_grpc_guided_through_prefill_and_decode_leaves_free_requests_alone(
    disagg_mesh: RunningMesh,
) -> None:
    stub = disagg_mesh.inference()
    free = pb.GenerateRequest(
        prompt="The three primary colors are",
        sampling=pb.SamplingOptions(max_tokens=24, temperature=0, ignore_eos=True),
        disaggregate=True,
    )
    alone, *_ = stream_ids(stub.Generate(free, timeout=RPC_TIMEOUT_S))
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "legs": {"type": "integer", "minimum": 0, "maximum": 8},
        },
        "required": ["name", "legs"],
    }
    guided = [
        pb.GenerateRequest(
            chat=pb.ChatMessages(
                messages=[pb.ChatMessage(role="user", content="Describe a spider as JSON.")]
            ),
            sampling=pb.SamplingOptions(
                max_tokens=60, temperature=0, guided_json=json.dumps(schema), guided_strict=True
            ),
            disaggregate=True,
        ),
        pb.GenerateRequest(
            prompt="Pick a color:",
            sampling=pb.SamplingOptions(
                max_tokens=8,
                temperature=0.8,
                seed=5,
                guided_choice=pb.GuidedChoice(choices=["red", "green", "blue"]),
            ),
            disaggregate=True,
        ),
    ]
    with ThreadPoolExecutor(3) as pool:
        futures = [
            pool.submit(lambda r: stream_ids(stub.Generate(r, timeout=RPC_TIMEOUT_S)), r)
            for r in (free, *guided)
        ]
        (mixed, *_), (_, spider, _, finish, *_), (_, color, *_) = [f.result() for f in futures]
    assert mixed == alone
    obj = json.loads(spider)
    jsonschema.validate(obj, {**schema, "additionalProperties": False})
    assert finish == pb.FINISH_REASON_STOP
    assert color in ("red", "green", "blue")


BAD_HTTP = [
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "objectx"}},
            }
        },
        "response_format",
    ),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
        "response_format",
    ),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_regex": "[a-"}, "guided_regex"),
    ({"guided_regex": r"[^\s\S]"}, "guided_regex"),  # can never match
    ({"guided_json": {"type": "string", "pattern": r"[^\s\S]"}}, "guided_json"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "a" * 70_000}, "guided_regex"),  # over the 64 KiB limit
    ({"guided_choice": ["a"], "guided_regex": "a"}, "guided_choice"),  # two at once
]


def test_bad_specs_get_400_naming_the_field_and_invalid_argument(disagg_mesh: RunningMesh) -> None:
    for extra, param in BAD_HTTP:
        body = {"prompt": "Hi", "max_tokens": 4, **extra}
        status, reply = disagg_mesh.http_post("/v1/completions", json.dumps(body).encode())
        assert status == 400, (extra, reply)
        check_error_body(reply, "invalid_value", param)
    client = disagg_mesh.openai()
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=_model(disagg_mesh),
            messages=[{"role": "user", "content": "Hi"}],
            extra_body={"guided_regex": "(unclosed"},
        )
    assert err.value.body["param"] == "guided_regex"  # type: ignore[index]
    stub = disagg_mesh.inference()
    bad = [
        pb.SamplingOptions(max_tokens=4, guided_json='{"type": '),
        pb.SamplingOptions(max_tokens=4, guided_regex=r"[^\s\S]"),
        pb.SamplingOptions(max_tokens=4, guided_choice=pb.GuidedChoice()),
        pb.SamplingOptions(max_tokens=4, guided_json="{", guided_strict=True),
    ]
    for sampling in bad:
        with pytest.raises(grpc.RpcError) as rpc_err:
            list(stub.Generate(pb.GenerateRequest(prompt="Hi", sampling=sampling), timeout=30))
        assert rpc_err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, sampling
        assert "guided" in rpc_err.value.details()
    # Still serving, nothing held.
    out = client.completions.create(
        model=_model(disagg_mesh), prompt="Hi", max_tokens=3, temperature=0
    )
    assert out.choices[0].text is not None
    assert_idle(disagg_mesh)


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 16}},
            "required": ["zone"],
        },
    },
}


def test_tool_calling_round_trip_with_the_openai_client(disagg_mesh: RunningMesh) -> None:
    """call (named, then required and streamed) -> the tool's result -> the answer."""
    client, model = disagg_mesh.openai(), _model(disagg_mesh)
    messages: list = [{"role": "user", "content": "What is the weather in Paris?"}]
    named = {
        "model": model,
        "messages": messages,
        "tools": [WEATHER_TOOL, TIME_TOOL],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "temperature": 0,
        "max_tokens": 60,
    }
    first = client.chat.completions.create(**named)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id
    args = json.loads(call.function.arguments)
    assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit")

    # The same call streamed, through the openai package's streaming helper: the name first,
    # then the arguments in fragments as they are generated, which it accumulates into the
    # non-streamed call.
    fragments = []
    with client.chat.completions.stream(**named) as events:
        for event in events:
            if event.type == "tool_calls.function.arguments.delta" and event.arguments_delta:
                assert event.name == "get_weather"
                fragments.append(event.arguments_delta)
        streamed = events.get_final_completion().choices[0]
    assert streamed.finish_reason == "tool_calls" and not streamed.message.content
    (streamed_call,) = streamed.message.tool_calls
    assert streamed_call.function.name == "get_weather" and streamed_call.id
    assert streamed_call.function.arguments == call.function.arguments
    assert len(fragments) > 1 and "".join(fragments) == call.function.arguments

    # required, streamed: the call arrives as tool_calls deltas the client can put together.
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice="required",
        temperature=0,
        max_tokens=60,
        stream=True,
    )
    names, arguments, finish, entries = [], "", None, 0
    for chunk in stream:
        for c in chunk.choices:
            for tc in c.delta.tool_calls or ():
                entries += 1
                names += [tc.function.name] if tc.function.name else []
                arguments += tc.function.arguments or ""
                assert (tc.id is not None) == (entries == 1)  # id and name on the first only
            finish = c.finish_reason or finish
    assert finish == "tool_calls" and len(names) == 1 and entries > 2
    assert names[0] in ("get_weather", "get_time") and isinstance(json.loads(arguments), dict)

    # The tool's result goes back; the model answers in text.
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18, "sky": "clear"}'},
    ]
    answer = client.chat.completions.create(
        model=model,
        messages=messages,
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice="none",
        temperature=0,
        max_tokens=24,
    )
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


def test_tools_over_grpc_and_bad_tools(disagg_mesh: RunningMesh) -> None:
    stub = disagg_mesh.inference()
    req = pb.GenerateRequest(
        chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="Time in Tokyo?")]),
        sampling=pb.SamplingOptions(max_tokens=40, temperature=0),
        tools_json=json.dumps([TIME_TOOL]),
        tool_choice_json="required",
        disaggregate=True,
    )
    replies = list(stub.Generate(req, timeout=RPC_TIMEOUT_S))
    text = "".join(r.text for r in replies)
    calls = [c for r in replies for c in r.tool_calls]
    assert len(calls) == 1, text
    call = calls[0]
    assert call.name == "get_time" and "zone" in json.loads(call.arguments)

    nameless = {"type": "function", "function": {"parameters": {"type": "object"}}}
    client = disagg_mesh.openai()
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=_model(disagg_mesh),
            messages=[{"role": "user", "content": "Hi"}],
            tools=[nameless],  # type: ignore[list-item]
        )
    assert err.value.body["param"] == "tools"  # type: ignore[index]
    with pytest.raises(grpc.RpcError) as rpc_err:
        list(stub.Generate(pb.GenerateRequest(chat=req.chat, tools_json=json.dumps([nameless]))))
    assert rpc_err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert_idle(disagg_mesh)
