"""The one validator, through both front doors' parsers: each bad input gets the right status
(HTTP and gRPC) and OpenAI's error shape; good inputs come out tokenized and capped."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor

from splitserve.model.loader import Checkpoint
from splitserve.router.errors import RequestValidationError, RouterError
from splitserve.router.grpc_api import generate_input
from splitserve.router.openai_protocol import parse_chat, parse_completion
from splitserve.router.validation import (
    SAMPLING_WIRE_TYPES,
    ModelInfo,
    RequestValidator,
    ValidatedRequest,
)
from splitserve.v1 import pb

CONTEXT = 64
MAX_BODY = 4096
MODEL = "test-model"


@pytest.fixture(scope="module")
def validator(smollm2_checkpoint: Checkpoint) -> RequestValidator:
    cfg = smollm2_checkpoint.config
    info = ModelInfo(MODEL, CONTEXT, cfg.vocab_size, aliases=(cfg.name,))
    assert smollm2_checkpoint.tokenizer is not None
    return RequestValidator(info, smollm2_checkpoint.tokenizer, MAX_BODY)


def http(validator: RequestValidator, body: dict[str, Any], chat: bool = False) -> ValidatedRequest:
    parse = parse_chat if chat else parse_completion
    parsed = parse(body, len(str(body)), None)
    *_, last = [asyncio.run(validator.validate(raw)) for raw in parsed.inputs()]
    return last


def test_the_openai_surface_passes_through(validator: RequestValidator) -> None:
    """n, best_of, echo with max_tokens 0 (lm-eval's loglikelihood), logit_bias, prompt lists."""
    body = {"prompt": [[1, 2, 3], "hi"], "echo": True, "logprobs": 1, "max_tokens": 0}
    parsed = parse_completion({**body, "n": 2, "best_of": 3, "logit_bias": {"7": -100}}, 9, None)
    reqs = [asyncio.run(validator.validate(raw)) for raw in parsed.inputs()]
    assert reqs[0].prompt_token_ids == [1, 2, 3] and len(reqs) == 2
    r = reqs[1]
    assert (r.n, r.best_of, r.echo, r.prompt_only, r.echo_text) == (2, 3, True, True, "hi")
    assert r.params.max_tokens == 1 and r.params.prompt_logprobs == 1
    assert r.params.logit_bias == ((7, -100.0),)
    grpc_req = pb.GenerateRequest(prompt="hi", n=2, echo=True)
    grpc_req.sampling.logit_bias[7] = -100.0
    grpc_req.sampling.logprobs = 0
    g = asyncio.run(validator.validate(generate_input(grpc_req)))
    assert (g.n, g.echo, g.params.logit_bias, g.params.prompt_logprobs) == (
        2,
        True,
        r.params.logit_bias,
        0,
    )


LONG = "hello " * 200  # ~200 tokens, over the 64-token context
BAD_COMPLETIONS = [
    # (body, http status, grpc code, OpenAI code, param)
    ({"prompt": ""}, 400, "INVALID_ARGUMENT", "empty_prompt", "prompt"),
    ({"prompt": []}, 400, "INVALID_ARGUMENT", "empty_prompt", "prompt"),
    ({"prompt": LONG}, 400, "INVALID_ARGUMENT", "context_length_exceeded", "prompt"),
    ({"prompt": "hi", "max_tokens": 0}, 400, "INVALID_ARGUMENT", "invalid_value", "max_tokens"),
    ({"prompt": "hi", "max_tokens": -3}, 400, "INVALID_ARGUMENT", "invalid_value", "max_tokens"),
    ({"prompt": "hi", "max_tokens": 10**9}, 400, "INVALID_ARGUMENT", "invalid_value", "max_tokens"),
    ({"prompt": "hi", "max_tokens": "8"}, 400, "INVALID_ARGUMENT", "invalid_value", "max_tokens"),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "NOT_FOUND", "model_not_found", "model"),
    ({"prompt": "hi", "temperature": -1}, 400, "INVALID_ARGUMENT", "invalid_value", "temperature"),
    ({"prompt": "hi", "top_p": 0}, 400, "INVALID_ARGUMENT", "invalid_value", "top_p"),
    ({"prompt": "hi", "top_p": 1.5}, 400, "INVALID_ARGUMENT", "invalid_value", "top_p"),
    ({"prompt": "hi", "n": 17}, 400, "INVALID_ARGUMENT", "invalid_value", "n"),
    ({"prompt": "hi", "n": 0}, 400, "INVALID_ARGUMENT", "invalid_value", "n"),
    ({"prompt": "hi", "n": 3, "best_of": 2}, 400, "INVALID_ARGUMENT", "invalid_value", "best_of"),
    ({"prompt": "hi", "best_of": 17}, 400, "INVALID_ARGUMENT", "invalid_value", "best_of"),
    ({"prompt": "hi", "echo": 1}, 400, "INVALID_ARGUMENT", "invalid_value", "echo"),
    (
        {"prompt": "hi", "logit_bias": {"5": 101}},
        400,
        "INVALID_ARGUMENT",
        "invalid_value",
        "logit_bias",
    ),
    (
        {"prompt": "hi", "logit_bias": {"99999999": 1}},
        400,
        "INVALID_ARGUMENT",
        "invalid_value",
        "logit_bias",
    ),
    (
        {"prompt": "hi", "logit_bias": {"x": 1}},
        400,
        "INVALID_ARGUMENT",
        "invalid_value",
        "logit_bias",
    ),
    ({"prompt": "hi", "logit_bias": [1]}, 400, "INVALID_ARGUMENT", "invalid_value", "logit_bias"),
    ({"prompt": "hi", "logprobs": -1}, 400, "INVALID_ARGUMENT", "invalid_value", "logprobs"),
    ({"prompt": "hi", "logprobs": 99}, 400, "INVALID_ARGUMENT", "invalid_value", "logprobs"),
    ({"prompt": "hi", "stop": ["x"] * 17}, 400, "INVALID_ARGUMENT", "invalid_value", "stop"),
    ({"prompt": "hi", "stop": [""]}, 400, "INVALID_ARGUMENT", "invalid_value", "stop"),
    ({"prompt": "hi", "seed": 2**64 - 1}, 400, "INVALID_ARGUMENT", "invalid_value", "seed"),
    ({"prompt": ["a", 5]}, 400, "INVALID_ARGUMENT", "invalid_value", "prompt"),
    ({"prompt": [10**9]}, 400, "INVALID_ARGUMENT", "invalid_value", "prompt"),
    ({"prompt": 5}, 400, "INVALID_ARGUMENT", "invalid_value", "prompt"),
    ({}, 400, "INVALID_ARGUMENT", "invalid_value", "prompt"),
    ({"prompt": "x" * MAX_BODY}, 413, "INVALID_ARGUMENT", "request_too_large", None),
]


@pytest.mark.parametrize(("body", "status", "grpc_code", "code", "param"), BAD_COMPLETIONS)
def test_bad_completion_requests(
    validator: RequestValidator,
    body: dict[str, Any],
    status: int,
    grpc_code: str,
    code: str,
    param: str | None,
) -> None:
    with pytest.raises(RouterError) as info:
        http(validator, body)
    err = info.value
    assert (err.http_status, err.grpc_code.name, err.code, err.param) == (
        status,
        grpc_code,
        code,
        param,
    )
    shape = err.openai_body()["error"]
    assert set(shape) == {"message", "type", "param", "code"}
    assert shape["type"] == "invalid_request_error" and shape["message"]


BAD_CHATS = [
    ({"messages": []}, "empty_prompt", "messages"),
    ({"messages": [{"role": "user", "content": ""}]}, "empty_prompt", "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "invalid_value", "messages[0].role"),
    ({"messages": [{"role": "user", "content": 3}]}, "invalid_value", "messages[0].content"),
    ({"messages": "hi"}, "invalid_value", "messages"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        "invalid_value",
        "messages[0].content",
    ),
    (
        {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
        "invalid_value",
        "top_logprobs",
    ),
    (
        {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 50},
        "invalid_value",
        "logprobs",
    ),
    ({"messages": [{"role": "user", "content": LONG}]}, "context_length_exceeded", "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "echo": True}, "invalid_value", "echo"),
]


@pytest.mark.parametrize(("body", "code", "param"), BAD_CHATS)
def test_bad_chat_requests(
    validator: RequestValidator, body: dict[str, Any], code: str, param: str
) -> None:
    with pytest.raises(RequestValidationError) as info:
        http(validator, body, chat=True)
    assert (info.value.http_status, info.value.code, info.value.param) == (400, code, param)


def test_max_tokens_is_capped_to_the_context_left(validator: RequestValidator) -> None:
    req = http(validator, {"prompt": "Hello there", "max_tokens": CONTEXT, "min_tokens": CONTEXT})
    room = CONTEXT - len(req.prompt_token_ids)
    assert req.params.max_tokens == room and req.params.min_tokens == room


def test_defaults_completion_16_chat_the_rest(validator: RequestValidator) -> None:
    assert http(validator, {"prompt": "Hello"}).params.max_tokens == 16
    chat = http(validator, {"messages": [{"role": "user", "content": "Hi"}]}, chat=True)
    assert chat.params.max_tokens == CONTEXT - len(chat.prompt_token_ids)


def test_good_requests_keep_their_options(validator: RequestValidator, smollm2_checkpoint) -> None:
    body = {"model": MODEL, "prompt": "Hi", "temperature": 0, "stop": "\n", "logprobs": 2}
    req = http(validator, body)
    assert req.prompt_token_ids == smollm2_checkpoint.tokenizer.encode("Hi")
    assert (req.params.temperature, req.params.stop, req.params.logprobs) == (0, ("\n",), 2)
    # The checkpoint's own name is an alias of the served name.
    assert http(validator, {"model": smollm2_checkpoint.config.name, "prompt": [1, 2]})


def test_chat_uses_the_template_without_extra_special_tokens(
    validator: RequestValidator, smollm2_checkpoint: Checkpoint
) -> None:
    tok = smollm2_checkpoint.tokenizer
    assert tok is not None
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    req = http(validator, {"messages": messages}, chat=True)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert req.prompt_token_ids == tok.encode(text, add_special_tokens=False)


def test_grpc_requests_go_through_the_same_checks(validator: RequestValidator) -> None:
    def check(request: pb.GenerateRequest) -> ValidatedRequest:
        return asyncio.run(validator.validate(generate_input(request)))

    ok = check(pb.GenerateRequest(prompt="Hi", sampling=pb.SamplingOptions(max_tokens=4)))
    assert ok.params.max_tokens == 4 and ok.params.temperature == 1.0 and ok.disaggregate is None
    forced = check(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2]), disaggregate=True))
    assert forced.disaggregate is True and forced.params.max_tokens == 16
    cases = [
        (pb.GenerateRequest(prompt=""), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.GenerateRequest(prompt="Hi", model="nope"), grpc.StatusCode.NOT_FOUND),
        (
            pb.GenerateRequest(prompt="Hi", sampling=pb.SamplingOptions(top_p=0)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            pb.GenerateRequest(prompt="Hi", sampling=pb.SamplingOptions(max_tokens=0)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (pb.GenerateRequest(chat=pb.ChatMessages()), grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for request, code in cases:
        with pytest.raises(RouterError) as info:
            check(request)
        assert info.value.grpc_code == code, request


def test_the_cache_salt_is_derived_from_the_callers_credential(
    validator: RequestValidator,
) -> None:
    def salt(caller: str | None, cache_salt: str | None = None) -> str | None:
        raw = parse_completion({"prompt": "Hi", "cache_salt": cache_salt}, 20, caller).raw
        return asyncio.run(validator.validate(raw)).cache_salt

    assert salt(None) is None and salt(None, "mine") == "mine"
    alice, bob = salt("Bearer alice"), salt("Bearer bob")
    assert alice and bob and alice != bob and salt("Bearer alice") == alice
    assert salt("Bearer alice", "mine") not in (alice, "mine", salt("Bearer bob", "mine"))


# ---- issue 14's odd inputs: each a 4xx, never a 500 -------------------------------------------
CHAT_HI = [{"role": "user", "content": "hi"}]
ODD_INPUTS = [
    # (body, chat, param)
    ({"prompt": "\ud800"}, False, "prompt"),
    ({"prompt": "ok \udfff ok"}, False, "prompt"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, True, "messages[0].content"),
    (
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a\ud800"}]}]},
        True,
        "messages[0].content",
    ),
    ({"prompt": "hi", "stop": ["\ud800"]}, False, "stop"),
    ({"prompt": "hi", "cache_salt": "\ud800"}, False, "cache_salt"),
    ({"messages": [{"role": ["user"], "content": "hi"}]}, True, "messages[0].role"),
    ({"messages": [{"role": {"user": 1}, "content": "hi"}]}, True, "messages[0].role"),
    ({"messages": CHAT_HI, "response_format": "json"}, True, "response_format"),
    ({"messages": CHAT_HI, "response_format": {"type": ["text"]}}, True, "response_format"),
    ({"messages": CHAT_HI, "response_format": {"type": "json_schema"}}, True, "response_format"),
    ({"prompt": "hi", "top_k": 10**30}, False, "top_k"),
    ({"prompt": "hi", "top_k": 2**31}, False, "top_k"),
    ({"prompt": "hi", "min_tokens": 2**32}, False, "min_tokens"),
    ({"prompt": "hi", "max_tokens": 2**32}, False, "max_tokens"),
    ({"prompt": "hi", "seed": 2**63}, False, "seed"),
    ({"prompt": "hi", "seed": -(2**63) - 1}, False, "seed"),
    ({"prompt": "hi", "logprobs": 2**32}, False, "logprobs"),
    ({"prompt": "hi", "stop_token_ids": [2**32]}, False, "stop_token_ids"),
    ({"prompt": "hi", "stop_token_ids": [-1]}, False, "stop_token_ids"),
    ({"prompt": "hi", "temperature": 1e39}, False, "temperature"),  # past float32
    ({"prompt": "hi", "temperature": 10**400}, False, "temperature"),  # past float64
    ({"prompt": "hi", "top_p": 1e-50}, False, "top_p"),  # rounds to 0 in float32
    ({"prompt": "hi", "presence_penalty": float("nan")}, False, "presence_penalty"),
    ({"prompt": "hi", "frequency_penalty": float("inf")}, False, "frequency_penalty"),
    ({"prompt": "hi", "stop": ["x"] * 500}, False, "stop"),
    ({"prompt": "hi", "stop": ["x" * 2000]}, False, "stop"),
    ({"prompt": "hi", "stop": {"a": 1}}, False, "stop"),
    ({"prompt": "hi", "stop": 5}, False, "stop"),
    ({"prompt": "hi", "temperature": "0.5"}, False, "temperature"),
    ({"prompt": "hi", "top_k": 5.0}, False, "top_k"),
    ({"prompt": "hi", "top_k": True}, False, "top_k"),
    ({"prompt": "hi", "ignore_eos": "yes"}, False, "ignore_eos"),
    ({"prompt": "hi", "stop_token_ids": "12"}, False, "stop_token_ids"),
    ({"prompt": 3.5}, False, "prompt"),
    ({"prompt": "hi", "model": ["m"]}, False, "model"),
    ({"prompt": "hi", "stream": "true"}, False, "stream"),
    ({"prompt": "hi", "stream": True, "stream_options": [1]}, False, "stream_options"),
    ({"prompt": "hi", "stream": True, "stream_options": "yes"}, False, "stream_options"),
    (
        {"prompt": "hi", "stream": True, "stream_options": {"include_usage": 1}},
        False,
        "stream_options",
    ),
]


@pytest.mark.parametrize(("body", "chat", "param"), ODD_INPUTS)
def test_odd_inputs_get_a_400_naming_the_field(
    validator: RequestValidator, body: dict[str, Any], chat: bool, param: str
) -> None:
    with pytest.raises(RequestValidationError) as info:
        http(validator, body, chat=chat)
    err = info.value
    assert (err.http_status, err.grpc_code, err.param) == (
        400,
        grpc.StatusCode.INVALID_ARGUMENT,
        param,
    )
    assert len(err.message) < 300  # never a megabyte of the value echoed back


def test_every_sampling_field_has_its_wire_type() -> None:
    """The one table covers exactly the proto's SamplingOptions fields, with matching types
    (but structured output's, which router/structured.py checks)."""
    proto = pb.SamplingOptions.DESCRIPTOR
    guided = {f.name for f in proto.oneofs_by_name["guided"].fields} | {"guided_strict"}
    assert set(SAMPLING_WIRE_TYPES) == {f.name for f in proto.fields} - guided
    kinds = {
        FieldDescriptor.TYPE_UINT32: "uint32",
        FieldDescriptor.TYPE_INT32: "int32",
        FieldDescriptor.TYPE_INT64: "int64",
        FieldDescriptor.TYPE_FLOAT: "float",
        FieldDescriptor.TYPE_BOOL: "bool",
        FieldDescriptor.TYPE_STRING: "string",
    }
    for f in proto.fields:
        if f.name in guided:
            continue
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            assert SAMPLING_WIRE_TYPES[f.name] == "bias", f.name  # logit_bias: id -> float
            continue
        kind = kinds[f.type]
        repeated = getattr(f, "is_repeated", None)
        if repeated is None:
            repeated = f.label == FieldDescriptor.LABEL_REPEATED
        expected = kind + "s" if repeated else kind
        assert SAMPLING_WIRE_TYPES[f.name] == expected, f.name


def test_what_passes_fits_the_wire(validator: RequestValidator) -> None:
    """Edge values that pass become a SamplingOptions without error, as the worker sees them."""
    body = {
        "prompt": "hi",
        "top_k": 2**31 - 1,
        "seed": -(2**63),
        "temperature": 3e38,
        "top_p": 0.1,
        "stop_token_ids": [0],
    }
    params = http(validator, body).params
    opts = pb.SamplingOptions(
        top_k=params.top_k,
        seed=params.seed,
        temperature=params.temperature,
        top_p=params.top_p,
        stop_token_ids=params.stop_token_ids,
    )
    assert opts.top_p == params.top_p  # already float32: no change on the wire
    assert opts.temperature == params.temperature


def test_grpc_floats_nan_and_inf_are_invalid(validator: RequestValidator) -> None:
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "repetition_penalty"):
        for value in (float("nan"), float("inf"), float("-inf")):
            sampling = pb.SamplingOptions(**{name: value})
            raw = generate_input(pb.GenerateRequest(prompt="Hi", sampling=sampling))
            with pytest.raises(RequestValidationError) as info:
                asyncio.run(validator.validate(raw))
            assert info.value.grpc_code == grpc.StatusCode.INVALID_ARGUMENT, (name, value)
