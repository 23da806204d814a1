"""Bad requests through the whole disaggregated mesh fail alone, with the right status.

Over HTTP (the official `openai` client, plus raw bodies it can't send) each bad request gets
its 4xx and an OpenAI-shaped error body (`{"error": {"message", "type", "param", "code"}}`);
over gRPC the same mistakes get INVALID_ARGUMENT / NOT_FOUND (and a message over gRPC's size
limit RESOURCE_EXHAUSTED). A prompt the router accepts but the workers' KV pool can't hold is
refused by the prefill worker, and the router passes that on as a client error, not a 5xx.
Afterwards ordinary requests succeed on both front doors and nothing is left held anywhere.
"""

from __future__ import annotations

import json
import select
import socket

import grpc
import openai
import pytest
from mesh_fixtures import RPC_TIMEOUT_S, RunningMesh, assert_idle, stream_ids

from splitserve.v1 import pb

pytestmark = pytest.mark.slow

MIB = 1024 * 1024
HUGE = 100 * 1000 * 1000  # a 100 MB body
OVER_CONTEXT = "hello " * 9000  # more tokens than the model's 8,192-token context
# Fits the model's context (the router's check) but not a worker's 96 MiB pool (2,176 tokens).
OVER_POOL = " ".join(f"Line {i} of a long report." for i in range(500))


def check_error_body(
    body: dict,
    code: str | None,
    param: str | None = None,
    error_type: str = "invalid_request_error",
) -> dict:
    """OpenAI's error shape (the openai client hands over the inner `error` object)."""
    body = body.get("error", body)
    assert set(body) == {"message", "type", "param", "code"}, body
    assert body["type"] == error_type and body["message"], body
    assert body["code"] == code, body
    if param is not None:
        assert body["param"] == param, body
    return body


def test_bad_http_requests_get_4xx_with_openai_error_bodies(disagg_mesh):
    client = disagg_mesh.openai()
    model = client.models.list().data[0].id
    ok = dict(model=model, prompt="Hi", max_tokens=2)
    bad_request, not_found = openai.BadRequestError, openai.NotFoundError
    cases = [  # (what, request, error, code, param)
        ("empty prompt", dict(ok, prompt=""), bad_request, "empty_prompt", "prompt"),
        (
            "over context",
            dict(ok, prompt=OVER_CONTEXT),
            bad_request,
            "context_length_exceeded",
            "prompt",
        ),
        ("over the pool", dict(ok, prompt=OVER_POOL), bad_request, "invalid_argument", None),
        ("max_tokens 0", dict(ok, max_tokens=0), bad_request, "invalid_value", "max_tokens"),
        ("max_tokens 1e9", dict(ok, max_tokens=10**9), bad_request, "invalid_value", "max_tokens"),
        ("unknown model", dict(ok, model="no-such-model"), not_found, "model_not_found", "model"),
        ("temperature -1", dict(ok, temperature=-1), bad_request, "invalid_value", "temperature"),
        ("top_p 0", dict(ok, top_p=0), bad_request, "invalid_value", "top_p"),
        ("top_p 1.5", dict(ok, top_p=1.5), bad_request, "invalid_value", "top_p"),
    ]
    for what, kwargs, error, code, param in cases:
        with pytest.raises(error) as info:
            client.completions.create(**kwargs)
        assert info.value.status_code == (404 if error is not_found else 400), what
        body = check_error_body(info.value.body, code, param)
        if what == "over the pool":  # the prefill worker refused it; the router said so
            assert "limit is 2175" in body["message"], body
    with pytest.raises(bad_request) as info:
        client.chat.completions.create(model=model, messages=[], max_tokens=2)
    check_error_body(info.value.body, "empty_prompt", "messages")

    status, body = disagg_mesh.http_post("/v1/completions", b'{"prompt": "Hi", ')
    assert status == 400
    check_error_body(body, "invalid_json")


def post_huge(mesh: RunningMesh, chunked: bool) -> tuple[int, dict, int]:
    """POST a 100 MB body, 1 MiB at a time, stopping as soon as the router answers.

    Returns (status, JSON body, bytes of the body sent). Never holds more than 1 MiB.
    """
    head = "POST /v1/completions HTTP/1.1\r\nHost: e2e\r\nContent-Type: application/json\r\n"
    head += "Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {HUGE}\r\n"
    head += f"Authorization: Bearer {mesh.api_key}\r\n" if mesh.api_key else ""
    piece = b'{"prompt": "' + b"x" * (MIB - 12)
    sent = 0
    with socket.create_connection(("127.0.0.1", mesh.port("router", "http")), timeout=60) as s:
        s.sendall((head + "\r\n").encode())
        while sent < HUGE and not select.select([s], [], [], 0)[0]:
            data = piece[: HUGE - sent]
            frame = b"%x\r\n%b\r\n" % (len(data), data) if chunked else data
            try:
                s.sendall(frame)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(data)
            piece = b"x" * MIB
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < _length(reply):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    status_line, rest = reply.split(b"\r\n", 1)
    body = rest.split(b"\r\n\r\n", 1)[1][: _length(reply)]
    return int(status_line.split()[1]), json.loads(body), sent


def _length(reply: bytes) -> int:
    for line in reply.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 1 << 30


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_100mb_body_gets_413_before_the_router_reads_it(disagg_mesh, chunked):
    status, body, sent = post_huge(disagg_mesh, chunked)
    assert status == 413
    check_error_body(body, "request_too_large")
    assert sent < HUGE // 2, f"the router let {sent} bytes in before answering"


def grpc_error(mesh: RunningMesh, req: pb.GenerateRequest) -> grpc.RpcError:
    req.disaggregate = True  # through the disaggregated path, were it ever to get that far
    with pytest.raises(grpc.RpcError) as info:
        stream_ids(mesh.inference().Generate(req, timeout=RPC_TIMEOUT_S))
    return info.value


def test_bad_grpc_requests_get_invalid_argument_or_not_found(disagg_mesh, tokenizer):
    def sampling(**kw) -> pb.SamplingOptions:
        return pb.SamplingOptions(**{"max_tokens": 2, **kw})

    invalid = grpc.StatusCode.INVALID_ARGUMENT
    cases = [
        ("empty prompt", pb.GenerateRequest(prompt="", sampling=sampling()), invalid),
        ("over context", pb.GenerateRequest(prompt=OVER_CONTEXT, sampling=sampling()), invalid),
        ("over the pool", pb.GenerateRequest(prompt=OVER_POOL, sampling=sampling()), invalid),
        (
            "token id out of vocab",
            pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 10**6]), sampling=sampling()),
            invalid,
        ),
        ("max_tokens 0", pb.GenerateRequest(prompt="Hi", sampling=sampling(max_tokens=0)), invalid),
        (
            "max_tokens 1e9",
            pb.GenerateRequest(prompt="Hi", sampling=sampling(max_tokens=10**9)),
            invalid,
        ),
        (
            "unknown model",
            pb.GenerateRequest(model="no-such-model", prompt="Hi", sampling=sampling()),
            grpc.StatusCode.NOT_FOUND,
        ),
        (
            "temperature -1",
            pb.GenerateRequest(prompt="Hi", sampling=sampling(temperature=-1)),
            invalid,
        ),
        ("top_p 0", pb.GenerateRequest(prompt="Hi", sampling=sampling(top_p=0)), invalid),
        ("top_p 1.5", pb.GenerateRequest(prompt="Hi", sampling=sampling(top_p=1.5)), invalid),
        (
            "a 10 MB message",
            pb.GenerateRequest(prompt="x" * (10 * MIB), sampling=sampling()),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
    ]
    for what, req, code in cases:
        err = grpc_error(disagg_mesh, req)
        assert err.code() == code, f"{what}: {err.code()} {err.details()}"
        assert err.details(), what


def test_the_mesh_still_serves_and_is_idle(disagg_mesh):
    client = disagg_mesh.openai()
    out = client.completions.create(
        model=client.models.list().data[0].id, prompt="Hi", max_tokens=4, temperature=0
    )
    assert out.choices[0].finish_reason in ("length", "stop") and out.usage.completion_tokens
    req = pb.GenerateRequest(
        prompt="The capital of France is",
        sampling=pb.SamplingOptions(max_tokens=4, temperature=0),
        disaggregate=True,
    )
    ids, _, usage, finish = stream_ids(disagg_mesh.inference().Generate(req, timeout=RPC_TIMEOUT_S))
    assert ids and usage.completion_tokens == len(ids) and finish
    assert_idle(disagg_mesh)
