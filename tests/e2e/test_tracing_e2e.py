"""One trace across every hop: client -> router -> prefill -> (KV pull) -> decode -> kvstore.

Every service of the session's mesh runs with `SPLITSERVE_OTEL_EXPORTER=console`, so each
finished span is printed as JSON into that service's log file. A request carrying a W3C
`traceparent` (gRPC metadata, or the HTTP header) must produce spans in the router's, a
prefill worker's, the decode worker's and the kvstore's logs that all share its trace id, each
parented on the span of the hop that called it.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

import pytest
from mesh_fixtures import RPC_TIMEOUT_S, RunningMesh, assert_idle, stream_ids

from splitserve.v1 import pb, rpc

pytestmark = pytest.mark.slow

# ignore_eos: the prompts are random, and the test counts the tokens that come back.
GREEDY = pb.SamplingOptions(max_tokens=8, temperature=0, ignore_eos=True)


@dataclass(frozen=True)
class Span:
    service: str  # the log file it came from
    name: str
    trace_id: str  # 32 hex digits, no 0x
    span_id: str
    parent_id: str | None
    resource_service: str
    attributes: dict[str, Any]


def parse_spans(text: str, service: str) -> list[Span]:
    """The console exporter's spans: pretty-printed JSON objects between other log lines."""
    spans, buf = [], None
    for line in text.splitlines():
        if line == "{":
            buf = [line]
        elif buf is not None:
            buf.append(line)
            if line == "}":
                try:
                    obj = json.loads("\n".join(buf))
                except ValueError:
                    obj = None  # a log line from another thread cut into it
                buf = None
                if obj and "context" in obj:
                    spans.append(_span(obj, service))
    return spans


def _span(obj: dict[str, Any], service: str) -> Span:
    def hex_id(value: str | None) -> str | None:
        return value.removeprefix("0x") if value else None

    return Span(
        service=service,
        name=obj["name"],
        trace_id=hex_id(obj["context"]["trace_id"]) or "",
        span_id=hex_id(obj["context"]["span_id"]) or "",
        parent_id=hex_id(obj.get("parent_id")),
        resource_service=obj["resource"]["attributes"]["service.name"],
        attributes=obj.get("attributes") or {},
    )


def trace_spans(mesh: RunningMesh, trace_id: str) -> list[Span]:
    services = ["router", "kvstore", *mesh.workers]
    return [
        s for svc in services for s in parse_spans(mesh.log(svc), svc) if s.trace_id == trace_id
    ]


def wait_for_spans(mesh: RunningMesh, trace_id: str, names: set[str]) -> dict[str, Span]:
    """Spans are printed when they end, a moment after the client saw its last token."""
    deadline = time.monotonic() + 30
    while True:
        spans = trace_spans(mesh, trace_id)
        by_name = {s.name: s for s in spans}
        if names <= by_name.keys():
            counts = {n: sum(s.name == n for s in spans) for n in names}
            assert all(c == 1 for c in counts.values()), counts
            return by_name
        if time.monotonic() > deadline:
            got = sorted((s.service, s.name) for s in spans)
            raise AssertionError(
                f"trace {trace_id}: want {sorted(names)}, got {got}\n{warnings(mesh)}"
            )
        time.sleep(0.2)


def warnings(mesh: RunningMesh) -> str:
    """Every service's WARNING and ERROR log lines: why a span might be missing."""
    lines = [
        f"{svc}: {line}"
        for svc in ["router", "kvstore", *mesh.workers]
        for line in mesh.log(svc).splitlines()
        if " WARNING " in line or " ERROR " in line
    ]
    return "\n".join(lines[-40:])


def traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def unique_prompt(tag: str) -> str:
    """A few full blocks never seen before: the kvstore is asked, and written to."""
    return f"Trace {tag}: " + " ".join(f"step {i} of {tag} is done." for i in range(4))


def test_a_disaggregated_grpc_request_is_one_trace_across_every_service(disagg_mesh):
    mesh = disagg_mesh
    trace_id, client_span, header = traceparent()
    request_id = f"trace-{trace_id[:8]}"
    req = pb.GenerateRequest(
        request_id=request_id,
        prompt=unique_prompt(request_id),
        sampling=GREEDY,
        disaggregate=True,
    )
    responses = mesh.inference().Generate(
        req, timeout=RPC_TIMEOUT_S, metadata=(("traceparent", header),)
    )
    ids, _, _, _ = stream_ids(responses)
    assert len(ids) == GREEDY.max_tokens

    want = {
        "router.generate",
        "prefill.Prefill",
        "prefill.PullKV",
        "decode.Generate",
        "kvstore.match",
        "kvstore.put",
    }
    s = wait_for_spans(mesh, trace_id, want)
    # Each span comes from the service it names, in its own process and log.
    for span in s.values():
        assert span.resource_service == span.name.split(".")[0]
    assert s["router.generate"].service == "router"
    assert s["prefill.Prefill"].service in mesh.workers_of("prefill")
    assert s["prefill.PullKV"].service == s["prefill.Prefill"].service
    assert s["decode.Generate"].service == "decode-0"
    assert s["router.generate"].attributes["splitserve.request_id"] == request_id
    # Parent links: the caller's span, then hop by hop.
    router = s["router.generate"].span_id
    assert s["router.generate"].parent_id == client_span
    assert s["prefill.Prefill"].parent_id == router
    assert s["decode.Generate"].parent_id == router
    assert s["prefill.PullKV"].parent_id == s["decode.Generate"].span_id
    assert s["kvstore.match"].parent_id == s["prefill.Prefill"].span_id
    assert s["kvstore.put"].parent_id == s["prefill.Prefill"].span_id


def test_an_http_request_with_a_traceparent_header_is_one_trace(disagg_mesh):
    """The local path (short prompt over HTTP): router -> decode, which asks the kvstore."""
    mesh = disagg_mesh
    trace_id, client_span, header = traceparent()
    client = mesh.openai()
    out = client.completions.create(
        model=client.models.list().data[0].id,
        prompt=unique_prompt(trace_id[:8]),
        max_tokens=GREEDY.max_tokens,
        temperature=0,
        extra_body={"ignore_eos": True},
        extra_headers={"traceparent": header},
    )
    assert out.usage.completion_tokens == GREEDY.max_tokens
    s = wait_for_spans(mesh, trace_id, {"router.generate", "decode.Generate", "kvstore.match"})
    assert s["router.generate"].parent_id == client_span
    assert s["decode.Generate"].parent_id == s["router.generate"].span_id
    assert s["kvstore.match"].parent_id == s["decode.Generate"].span_id
    assert not any(span.name.startswith("prefill.") for span in trace_spans(mesh, trace_id))


def test_each_background_kvstore_write_joins_its_own_requests_trace(disagg_mesh):
    """Prefill twice on the same worker: each write-back is in its own request's trace,
    not in the trace of whichever request first started the worker's writer."""
    mesh = disagg_mesh
    worker = mesh.workers_of("prefill")[0]
    stub = rpc.PrefillStub(mesh.channel(worker))
    for i in range(2):
        trace_id, client_span, header = traceparent()
        ids = [1000 + (7 * j + 31 * i) % 3000 for j in range(40)]
        resp = stub.Prefill(
            pb.PrefillRequest(
                request_id=f"bg-{trace_id[:8]}", prompt_token_ids=ids, sampling=GREEDY
            ),
            timeout=RPC_TIMEOUT_S,
            metadata=(("traceparent", header),),
        )
        assert stub.ReleaseKV(pb.ReleaseKVRequest(lease_id=resp.kv.lease_id), timeout=10).released
        s = wait_for_spans(mesh, trace_id, {"prefill.Prefill", "kvstore.match", "kvstore.put"})
        assert s["prefill.Prefill"].parent_id == client_span
        assert s["kvstore.put"].parent_id == s["prefill.Prefill"].span_id, f"request {i}"


def test_the_mesh_is_idle_afterwards(disagg_mesh):
    assert_idle(disagg_mesh)
