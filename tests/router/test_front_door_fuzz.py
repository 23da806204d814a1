"""Property-based fuzzing of both public doors: no input reaches a 500 / INTERNAL.

A real Router (the SmolLM2 tokenizer, no workers) behind a real HttpApi and a real grpc.aio
InferenceServicer, on an event loop in a background thread; hypothesis sends what it likes:
arbitrary JSON for the two POST bodies (known fields with values of any type, NaN, lone
surrogates, deep nesting), raw bytes, and arbitrary GenerateRequest messages (every field
anywhere in its proto range). With no worker, a request that passes validation gets 503 /
UNAVAILABLE, so every answer is either that or a 4xx with OpenAI's error shape. Afterwards the
router still answers, with nothing left in flight.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from ports import free_port
from router_testing import Service

from splitserve.model.loader import Checkpoint
from splitserve.router.app import Router, RouterConfig
from splitserve.router.auth import Authenticator
from splitserve.router.grpc_api import SERVICE_NAME, InferenceServicer, add_to_server
from splitserve.router.http_api import HttpApi
from splitserve.v1 import pb, rpc

KEY = "fuzz-key"
FUZZ = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass
class Doors:
    router: Router
    http_port: int
    grpc_port: int


@contextmanager
def open_doors(router: Router) -> Iterator[Doors]:
    """Both doors on a loop in a thread; the tests are plain blocking clients."""
    loop = asyncio.new_event_loop()
    auth = Authenticator([KEY])
    http_api = HttpApi(router, "127.0.0.1", 0, auth=auth)
    servers: list[grpc.aio.Server] = []

    async def start() -> int:
        await router.start()
        server = grpc.aio.server()  # on the loop that serves it
        servers.append(server)
        add_to_server(InferenceServicer(router, auth), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await http_api.start()
        return port

    async def stop() -> None:
        await http_api.stop()
        await servers[0].stop(None)
        await router.close()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    grpc_port = asyncio.run_coroutine_threadsafe(start(), loop).result(60)
    try:
        yield Doors(router, http_api.bound_port(), grpc_port)
    finally:
        asyncio.run_coroutine_threadsafe(stop(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@pytest.fixture(scope="module")
def doors(smollm2_checkpoint: Checkpoint) -> Iterator[Doors]:
    """No worker: whatever passes validation gets 503 / UNAVAILABLE."""
    with open_doors(Router(RouterConfig(max_body_bytes=64 * 1024), smollm2_checkpoint)) as d:
        yield d


@pytest.fixture(scope="module")
def served_doors(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Doors]:
    """A real colocated worker (the tiny random model) behind the doors, with a 48-token
    context so that every request that passes is short: what passes must also be sendable to
    a worker, and served."""
    port = free_port()
    args = ["--role", "colocated", "--port", str(port), "--model", tiny_model_dir]
    args += ["--kv-cache-mib", "16", "--threads", "1"]
    logs = tmp_path_factory.mktemp("fuzz-worker")
    worker = Service("colocated", "splitserve.decode", args, logs, port)
    try:
        worker.wait_serving()
        config = RouterConfig(
            model=tiny_model_dir,
            colocated=(f"127.0.0.1:{port}",),
            max_model_len=48,
            max_body_bytes=64 * 1024,
        )
        with open_doors(Router(config)) as d:
            yield d
    finally:
        worker.stop()


# ---- HTTP -------------------------------------------------------------------------------------
# Every character, lone surrogates included (JSON escapes them as \ud800).
ANY_CHAR = st.characters(exclude_categories=())
TEXT = st.text(ANY_CHAR, max_size=12) | st.sampled_from(["\ud800", "hi", "user", "text", ""])
# Each wire type's edges (int32, uint32, int64, float32) and then anything.
EDGES = [
    10**30,
    10**400,
    2**64,
    2**63,
    -(2**63) - 1,
    2**32,
    2**31,
    2**31 - 1,
    -(2**31) - 1,
    0,
    1,
    -1,
    2,
]
EDGES += [1e300, -1e300, 1e39, 3.5e38, 1e-46, 0.5, -0.0]
NUMBERS = st.sampled_from(EDGES) | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
SCALARS = st.none() | st.booleans() | NUMBERS | TEXT
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
ROLE = st.sampled_from(["user", "system", "assistant", "tool"])
PART = st.fixed_dictionaries({"type": st.just("text") | JSON, "text": TEXT | JSON})
MESSAGE = st.fixed_dictionaries(
    {"role": ROLE | ROLE.map(lambda r: [r]) | JSON, "content": TEXT | st.lists(PART) | JSON}
) | st.fixed_dictionaries({}, optional={"role": ROLE, "content": TEXT})
FIELDS = {
    "model": st.none() | TEXT | JSON,
    "prompt": TEXT | st.lists(st.integers(-5, 2**33), max_size=4) | JSON,
    "messages": st.lists(MESSAGE, max_size=3) | JSON,
    "max_tokens": NUMBERS | JSON,
    "max_completion_tokens": NUMBERS | JSON,
    "temperature": NUMBERS | JSON,
    "top_p": NUMBERS | JSON,
    "top_k": NUMBERS | JSON,
    "min_p": NUMBERS | JSON,
    "presence_penalty": NUMBERS | JSON,
    "frequency_penalty": NUMBERS | JSON,
    "repetition_penalty": NUMBERS | JSON,
    "seed": NUMBERS | JSON,
    "stop": TEXT | st.lists(TEXT, max_size=20) | JSON,
    "stop_token_ids": st.lists(NUMBERS, max_size=4) | JSON,
    "ignore_eos": st.booleans() | JSON,
    "min_tokens": NUMBERS | JSON,
    "logprobs": NUMBERS | st.booleans() | JSON,
    "top_logprobs": NUMBERS | JSON,
    "n": NUMBERS | JSON,
    "best_of": NUMBERS | JSON,
    "stream": st.booleans() | JSON,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": JSON}) | JSON,
    "response_format": st.fixed_dictionaries({}, optional={"type": TEXT | JSON}) | JSON,
    "cache_salt": TEXT | JSON,
    "timeout": NUMBERS | JSON,
    "echo": JSON,
    "logit_bias": JSON,
}


@st.composite
def bodies(draw: st.DrawFn, chat: bool) -> Any:
    """Mostly a valid body with one or two fields replaced (so the odd value gets past the
    checks before its own), sometimes any JSON at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON | st.fixed_dictionaries({}, optional=FIELDS))
    body: dict[str, Any] = {"max_tokens": 2}
    if chat:
        body["messages"] = [{"role": "user", "content": "Hi"}]
    else:
        body["prompt"] = "Hi"
    # The input itself is the likeliest to be odd: a third of the draws.
    main = "messages" if chat else "prompt"
    names = st.sampled_from([main] * (len(FIELDS) // 2) + sorted(FIELDS))
    for name in draw(st.lists(names, min_size=1, max_size=2)):
        body[name] = draw(FIELDS[name])
    return body


def post(doors: Doors, path: str, body: bytes, content_type: str = "application/json") -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", doors.http_port, timeout=30)
    try:
        headers = {"Authorization": f"Bearer {KEY}", "Content-Type": content_type}
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def assert_openai_answer(status: int, payload: bytes) -> None:
    assert status != 500 and status < 600, payload[:300]
    if status == 200:
        return
    assert 400 <= status < 600, status
    assert status in {400, 404, 413, 415, 429, 503, 504}, (status, payload[:300])
    error = json.loads(payload)["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and "param" in error and "code" in error
    if status == 503:  # valid, but there is no worker
        assert error["code"] == "service_unavailable", error
    if status == 504:  # valid, with a `timeout` too short to be served in
        assert error["code"] == "deadline_exceeded", error


@FUZZ
@given(body=bodies(chat=False))
def test_http_completion_bodies_never_get_a_500(doors: Doors, body: Any) -> None:
    assert_openai_answer(*post(doors, "/v1/completions", json.dumps(body).encode()))


@FUZZ
@given(body=bodies(chat=True))
def test_http_chat_bodies_never_get_a_500(doors: Doors, body: Any) -> None:
    assert_openai_answer(*post(doors, "/v1/chat/completions", json.dumps(body).encode()))


@settings(FUZZ, max_examples=120)
@given(body=bodies(chat=False), chat_body=bodies(chat=True))
def test_http_bodies_that_pass_are_served(served_doors: Doors, body: Any, chat_body: Any) -> None:
    """With a worker, what passes validation is sent to it: no value may break that step."""
    for path, payload in (("/v1/completions", body), ("/v1/chat/completions", chat_body)):
        status, reply = post(served_doors, path, json.dumps(payload).encode())
        assert_openai_answer(status, reply)
        assert status != 503, reply[:300]  # the worker is there


NUMERIC_FIELDS = [
    "max_tokens",
    "min_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "seed",
    "logprobs",
    "stop_token_ids",
]


def test_every_field_at_every_edge_is_served_or_refused(served_doors: Doors) -> None:
    """Not left to chance: each numeric field at each wire type's edge, the rest valid (a
    value past its proto field's range that SamplingParams allows, e.g. top_k = 10**30, used
    to fail only when the worker's request was built)."""
    statuses = set()
    for name in NUMERIC_FIELDS:
        for value in [*EDGES, float("nan"), float("inf")]:
            body = {
                "prompt": "Hi",
                "max_tokens": 2,
                name: [value] if name == "stop_token_ids" else value,
            }
            status, reply = post(served_doors, "/v1/completions", json.dumps(body).encode())
            assert status in (200, 400), (name, value, status, reply[:300])
            assert_openai_answer(status, reply)
            statuses.add(status)
    assert statuses == {200, 400}


@FUZZ
@given(raw=st.binary(max_size=256) | JSON.map(lambda v: json.dumps(v).encode()[:-1]))
def test_http_raw_bytes_never_get_a_500(doors: Doors, raw: bytes) -> None:
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert_openai_answer(*post(doors, path, raw))


@settings(max_examples=50, deadline=None)
@given(content_type=st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40))
# parameters cut short, which made the stdlib's MIME parser (behind aiohttp's content_type)
# raise: found by this test in CI
@example(content_type=";0*")
@example(content_type="application/json;E*")
@example(content_type=" Application/JSON ; charset=utf-8")
def test_http_any_content_type_gets_json_or_415(doors: Doors, content_type: str) -> None:
    status, payload = post(doors, "/v1/completions", b'{"prompt": "Hi"}', content_type)
    assert_openai_answer(status, payload)
    assert status in (400, 415, 503), status


# ---- gRPC -------------------------------------------------------------------------------------
UINT32 = st.integers(0, 2**32 - 1)
INT32 = st.integers(-(2**31), 2**31 - 1)
FLOAT32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
PROTO_TEXT = st.text(max_size=20)  # protobuf strings are valid UTF-8: no surrogates
SAMPLING = st.builds(
    pb.SamplingOptions,
    max_tokens=st.none() | UINT32,
    min_tokens=UINT32,
    temperature=st.none() | FLOAT32,
    top_p=st.none() | FLOAT32,
    top_k=INT32,
    min_p=FLOAT32,
    repetition_penalty=st.none() | FLOAT32,
    presence_penalty=FLOAT32,
    frequency_penalty=FLOAT32,
    seed=st.none() | st.integers(-(2**63), 2**63 - 1),
    stop=st.lists(PROTO_TEXT, max_size=20),
    stop_token_ids=st.lists(UINT32, max_size=4),
    ignore_eos=st.booleans(),
    logprobs=st.none() | UINT32,
)
CHAT = st.builds(
    pb.ChatMessages,
    messages=st.lists(
        st.builds(
            pb.ChatMessage,
            role=st.sampled_from(["user", "system", "assistant", "tool"]) | PROTO_TEXT,
            content=PROTO_TEXT,
        ),
        max_size=3,
    ),
)


@st.composite
def generate_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    req = pb.GenerateRequest(
        model=draw(st.sampled_from(["", "nope"]) | PROTO_TEXT),
        request_id=draw(st.just("") | PROTO_TEXT),
        cache_salt=draw(st.just("") | PROTO_TEXT | st.text(max_size=300)),
        sampling=draw(SAMPLING),
    )
    kinds = ["prompt", "chat", "token_ids", "prompts", "token_id_lists", "none"]
    kind = draw(st.sampled_from(kinds))
    token_ids = st.lists(UINT32 | st.integers(0, 50_000), max_size=6)
    if kind == "prompt":
        req.prompt = draw(PROTO_TEXT)
    elif kind == "chat":
        req.chat.CopyFrom(draw(CHAT))
    elif kind == "token_ids":
        req.token_ids.ids.extend(draw(token_ids))
    elif kind == "prompts":  # a list of prompts: empty, too long, an empty one, ...
        req.prompts.SetInParent()
        req.prompts.texts.extend(draw(st.lists(PROTO_TEXT, max_size=3) | st.just(["a"] * 257)))
    elif kind == "token_id_lists":
        req.token_id_lists.SetInParent()
        for ids in draw(st.lists(token_ids, max_size=3)):
            req.token_id_lists.lists.add().ids.extend(ids)
    if draw(st.booleans()):
        req.n, req.best_of = draw(st.integers(0, 20)), draw(st.integers(0, 20))
    disaggregate = draw(st.none() | st.booleans())
    if disaggregate is not None:
        req.disaggregate = disaggregate
    return req


@pytest.fixture(scope="module")
def inference(doors: Doors) -> Iterator[rpc.InferenceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{doors.grpc_port}") as channel:
        yield rpc.InferenceStub(channel)


def status_of(stub: rpc.InferenceStub, request: pb.GenerateRequest) -> grpc.StatusCode:
    try:
        for _ in stub.Generate(request, metadata=[("authorization", KEY)], timeout=30):
            pass
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


@FUZZ
@given(request=generate_requests())
def test_grpc_requests_never_get_internal(
    inference: rpc.InferenceStub, request: pb.GenerateRequest
) -> None:
    code = status_of(inference, request)
    assert code in {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.UNAVAILABLE,  # valid; no worker
    }, (code, request)


@settings(FUZZ, max_examples=120)
@given(request=generate_requests())
def test_grpc_requests_that_pass_are_served(
    served_doors: Doors, request: pb.GenerateRequest
) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{served_doors.grpc_port}") as channel:
        code = status_of(rpc.InferenceStub(channel), request)
    assert code in {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
    }, (code, request)


@FUZZ
@given(
    raw=st.binary(max_size=64)
    | generate_requests().map(lambda r: r.SerializeToString()[:-1])
    | PROTO_TEXT.map(lambda t: pb.GenerateRequest(prompt=t).SerializeToString() + b"\xff")
)
def test_grpc_raw_bytes_never_get_internal_or_unknown(
    doors: Doors, inference: rpc.InferenceStub, raw: bytes
) -> None:
    """Bytes that aren't a GenerateRequest (corrupt, truncated, a string not UTF-8)."""
    with grpc.insecure_channel(f"127.0.0.1:{doors.grpc_port}") as channel:
        generate = channel.unary_stream(
            f"/{SERVICE_NAME}/Generate",
            request_serializer=lambda b: b,
            response_deserializer=pb.GenerateResponse.FromString,
        )
        try:
            list(generate(raw, metadata=[("authorization", KEY)], timeout=30))
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
    assert code in {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.UNAVAILABLE,
    }, (code, raw)


def test_grpc_a_string_that_is_not_utf8_is_invalid_argument(doors: Doors) -> None:
    good = pb.GenerateRequest(prompt="ab").SerializeToString()
    with grpc.insecure_channel(f"127.0.0.1:{doors.grpc_port}") as channel:
        generate = channel.unary_stream(f"/{SERVICE_NAME}/Generate", request_serializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as info:
            list(generate(good.replace(b"ab", b"\xff\xfe"), metadata=[("authorization", KEY)]))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "UTF-8" in (info.value.details() or "")
        with pytest.raises(grpc.RpcError) as info:  # the key is checked first
            list(generate(b"\xff\xff"))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


# ---- afterwards -------------------------------------------------------------------------------
def test_the_doors_still_answer_after_fuzzing(doors: Doors, inference: rpc.InferenceStub) -> None:
    """Runs last in this module: nothing leaked, both doors serve."""
    status, payload = post(doors, "/v1/completions", b'{"prompt": "Hi", "max_tokens": 2}')
    assert status == 503 and json.loads(payload)["error"]["code"] == "service_unavailable"
    models = inference.ListModels(
        pb.ListModelsRequest(), metadata=[("authorization", f"Bearer {KEY}")], timeout=10
    )
    assert models.models[0].id == doors.router.model.name
    request = pb.GenerateRequest(prompt="Hi", sampling=pb.SamplingOptions(max_tokens=2))
    assert status_of(inference, request) == grpc.StatusCode.UNAVAILABLE
    assert doors.router.num_inflight == 0 and not doors.router.active
    body = doors.router.metrics.render().decode()
    assert 'status="internal_error"' not in body
