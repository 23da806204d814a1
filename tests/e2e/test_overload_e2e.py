"""Overload sheds, deadlines end requests, and a draining router ends its streams cleanly:
through a real mesh.

One small mesh for the module: the tiny random checkpoint on one colocated worker that runs at
most 2 sequences at once (--max-num-seqs 2), behind a router with no queue
(--max-queued-requests 0) and a 1 s drain. The router admits as many requests as the worker
reports it runs at once (2); in order:

1. 4x that at once: the admitted ones complete, every other one gets 429 at once, with
   Retry-After and OpenAI's error body; nothing is left held.
2. Deadlines (X-Request-Timeout, the body's `timeout`, gRPC's deadline) that pass mid-request:
   504 / DEADLINE_EXCEEDED, an error event then [DONE] on a stream that had started, and the
   worker's KV back at its baseline.
3. SIGTERM to the router with streams still running: new requests get 503, and once the drain
   is over every open stream ends with an error event and [DONE] (HTTP) or UNAVAILABLE (gRPC),
   never a silently cut body; the router exits 0.
"""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from mesh_fixtures import RunningMesh, idle_report, metric_samples, metric_value, start_mesh

from splitserve.v1 import pb

pytestmark = pytest.mark.slow

LIMIT = 2  # --max-num-seqs 2 (the router sends a worker no more than it runs at once)
LONG = 1900  # tokens: a request that outlasts every timeout here (the context is 2048)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: str) -> Iterator[RunningMesh]:
    running = start_mesh(
        tmp_path_factory.mktemp("overload-mesh"),
        *("--model", tiny_model_dir, "--colocated", "--max-num-seqs", "2"),
        router_flags=("--max-queued-requests", "0", "--drain-seconds", "1"),
    )
    try:
        yield running
    finally:
        running.stop()


# ---- HTTP without a client library: statuses, headers and raw SSE ------------------------------
def post(
    mesh: RunningMesh, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", mesh.port("router", "http"), timeout=300)
    try:
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        if mesh.api_key:
            all_headers["Authorization"] = f"Bearer {mesh.api_key}"
        conn.request("POST", "/v1/completions", json.dumps(body), all_headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def sse_events(raw: bytes) -> list[Any]:
    """The `data:` payloads of an SSE body, JSON-decoded except the final [DONE]."""
    out: list[Any] = []
    for line in raw.decode().splitlines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def completion(max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {
        "prompt": "Tell me everything about the sea.",
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        **extra,
    }


def wait_idle(mesh: RunningMesh, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while problems := idle_report(mesh):
        if time.monotonic() > deadline:
            raise AssertionError("the mesh did not return to idle:\n" + "\n".join(problems))
        time.sleep(0.25)


# ---- the story, in order ------------------------------------------------------------------------
def test_the_router_admits_what_the_worker_reports_it_can_hold(mesh):
    worker = mesh.address("colocated-0")
    samples = metric_samples(mesh.router_metrics(), "splitserve_router_worker_request_limit")
    assert {labels["worker"]: v for labels, v in samples} == {worker: LIMIT}
    assert mesh.load("colocated-0").max_num_seqs == 2


def test_at_four_times_capacity_the_rest_get_429_with_retry_after(mesh):
    n = 4 * LIMIT
    barrier = threading.Barrier(n)

    def one(_: int) -> tuple[int, dict[str, str], bytes]:
        barrier.wait()
        return post(mesh, completion(400))

    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    ok = [json.loads(body) for status, _, body in results if status == 200]
    shed = [(headers, json.loads(body)) for status, headers, body in results if status == 429]
    assert len(ok) + len(shed) == n, [status for status, _, _ in results]
    assert len(ok) >= LIMIT and len(shed) >= n - 2 * LIMIT  # the pool held its share, no more
    for reply in ok:
        assert reply["usage"]["completion_tokens"] == 400
        assert reply["choices"][0]["finish_reason"] == "length"
    for headers, body in shed:
        assert int(headers["retry-after"]) >= 1
        error = body["error"]
        assert error["code"] == "server_overloaded" and error["type"] == "rate_limit_error"
        assert "retry later" in error["message"]
    text = mesh.router_metrics()
    assert metric_value(text, "splitserve_router_requests_shed_total", reason="queue_full") == (
        len(shed)
    )
    wait_idle(mesh)


@pytest.mark.parametrize("how", ["header", "body"], ids=["X-Request-Timeout", "timeout-field"])
def test_a_deadline_that_passes_gives_504_and_frees_the_kv(mesh, how):
    headers, extra = (
        ({"X-Request-Timeout": "0.5"}, {}) if how == "header" else ({}, {"timeout": 0.5})
    )
    status, _, body = post(mesh, completion(LONG, **extra), headers)
    assert status == 504, body
    error = json.loads(body)["error"]
    assert error["code"] == "deadline_exceeded" and "deadline of 0.5 s" in error["message"]
    wait_idle(mesh)


def test_a_deadline_that_passes_mid_stream_ends_it_with_an_error_event(mesh):
    status, headers, raw = post(mesh, completion(LONG, stream=True), {"X-Request-Timeout": "1.5"})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "deadline_exceeded"
    assert any(e.get("choices") for e in events[:-2])  # tokens had streamed before it
    wait_idle(mesh)


def test_a_grpc_deadline_gives_deadline_exceeded_and_frees_the_kv(mesh):
    req = pb.GenerateRequest(
        prompt="Tell me everything about the sea.",
        sampling=pb.SamplingOptions(max_tokens=LONG, temperature=0, ignore_eos=True),
    )
    with pytest.raises(grpc.RpcError) as info:
        for _ in mesh.inference().Generate(req, timeout=1.0):
            pass
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_idle(mesh)


def test_a_bad_timeout_is_400(mesh):
    status, _, body = post(mesh, completion(4), {"X-Request-Timeout": "soon"})
    assert status == 400 and json.loads(body)["error"]["param"] == "timeout"
    status, _, body = post(mesh, completion(4, timeout=-1))
    assert status == 400 and json.loads(body)["error"]["param"] == "timeout"


def test_sigterm_ends_every_open_stream_with_an_error_and_a_proper_end(mesh):
    router = mesh.mesh.children["router"]
    results: dict[str, Any] = {}

    def http_stream() -> None:
        results["http"] = post(mesh, completion(LONG, stream=True))

    def grpc_stream() -> None:
        req = pb.GenerateRequest(
            prompt="Tell me everything about the sea.",
            sampling=pb.SamplingOptions(max_tokens=LONG, temperature=0, ignore_eos=True),
        )
        n = 0
        try:
            for r in mesh.inference().Generate(req, timeout=300):
                n += len(r.token_ids)
            results["grpc"] = ("finished", n)
        except grpc.RpcError as e:
            results["grpc"] = (e.code(), e.details(), n)

    threads = [threading.Thread(target=f) for f in (http_stream, grpc_stream)]
    before = metric_value(mesh.router_metrics(), "splitserve_router_generation_tokens_total")
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while (
        metric_value(mesh.router_metrics(), "splitserve_router_generation_tokens_total") - before
        < 8
    ):
        assert time.monotonic() < deadline, "the streams never started"
        time.sleep(0.05)
    router.signal_group(signal.SIGTERM)
    time.sleep(0.3)
    status, _, body = post(mesh, completion(4))  # while draining: refused, not queued
    assert status == 503 and json.loads(body)["error"]["code"] == "service_unavailable"
    for t in threads:
        t.join(120)
    status, _, raw = results["http"]
    assert status == 200
    events = sse_events(raw)
    assert events[-1] == "[DONE]"  # a proper end, after the error
    assert "shutting down" in events[-2]["error"]["message"]
    code, details, n = results["grpc"]
    assert code == grpc.StatusCode.UNAVAILABLE and "shutting down" in details and n > 0
    assert router.proc.wait(60) == 0
    assert "Traceback" not in mesh.log("router")
    # The worker saw both streams cancelled and gave their KV back.
    deadline = time.monotonic() + 60
    while (load := mesh.load("colocated-0")).num_running or load.kv_usage:
        assert time.monotonic() < deadline, load
        time.sleep(0.25)
