"""Greedy output through a real mesh equals the in-process engine's, for the same token ids.

Two meshes, each started as `splitserve up` starts it: the session's disaggregated one
(kvstore on Redis, prefill workers, a decode worker, the router) and a colocated one (one
colocated worker and the router, in-memory kvstore). Clients: the official `openai` package on
the router's HTTP (completions with a raw prompt, chat; streamed and not) and the generated
gRPC stubs (token for token; `disaggregate` forced both ways, so the prefill -> KV transfer ->
decode path and the local-prefill path both run), then a batch of concurrent requests, which
the decode worker must batch and still answer exactly as the engine does one by one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from mesh_fixtures import (
    RPC_TIMEOUT_S,
    RunningMesh,
    assert_idle,
    chat_ids,
    greedy,
    metric_value,
    prompt_ids,
    start_mesh,
    stream_ids,
)

from splitserve.engine.engine import LLMEngine
from splitserve.engine.tokenizer import Tokenizer
from splitserve.v1 import pb

# `mesh` reaches the session's disagg_mesh by name: its group (tests/conftest.py).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("disagg_mesh")]

MAX_TOKENS = 24
PROMPT = "The three primary colours are"
CHAT = [{"role": "user", "content": "Name two planets of the solar system."}]
# Over the router's --disagg-min-tokens (256): the router prefills it remotely on its own.
LONG_PROMPT = " ".join(f"Box {i} holds {i * 7} marbles." for i in range(40))
BATCH = [
    [{"role": "user", "content": f"Write one short sentence about the number {n}."}]
    for n in (3, 7, 12, 40, 99, 256)
]
GREEDY = pb.SamplingOptions(max_tokens=MAX_TOKENS, temperature=0)


@pytest.fixture(scope="module")
def colocated_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    mesh = start_mesh(tmp_path_factory.mktemp("colocated-mesh"), "--colocated")
    try:
        yield mesh
    finally:
        mesh.stop()


@pytest.fixture(scope="module", params=["disaggregated", "colocated"])
def mesh(request: pytest.FixtureRequest) -> RunningMesh:
    """Each test runs on both meshes (all disaggregated ones first: module-scoped params)."""
    name = "disagg_mesh" if request.param == "disaggregated" else "colocated_mesh"
    return request.getfixturevalue(name)


def disaggregated(mesh: RunningMesh) -> bool:
    return bool(mesh.workers_of("prefill"))


@pytest.fixture(scope="module")
def prompts(tokenizer: Tokenizer) -> dict[str, list[int]]:
    """Every prompt the module sends, tokenized exactly as the router does."""
    out = {
        "prompt": prompt_ids(tokenizer, PROMPT),
        "chat": chat_ids(tokenizer, CHAT),
        "long": prompt_ids(tokenizer, LONG_PROMPT),
    }
    out.update({f"batch{i}": chat_ids(tokenizer, m) for i, m in enumerate(BATCH)})
    assert len(out["long"]) > 256
    return out


@pytest.fixture(scope="module")
def expected(reference_engine: LLMEngine, prompts: dict[str, list[int]]) -> dict[str, list[int]]:
    outs = greedy(reference_engine, list(prompts.values()), MAX_TOKENS)
    return dict(zip(prompts, outs, strict=True))


def routes(mesh: RunningMesh) -> dict[tuple[str, str], float]:
    """The router's routing decisions so far, by (mode, reason)."""
    text = mesh.router_metrics()
    return {
        (mode, reason): metric_value(
            text, "splitserve_router_routing_decisions_total", mode=mode, reason=reason
        )
        for mode in ("disaggregated", "local")
        for reason in ("requested", "long_prompt", "short_prompt", "no_prefill_workers")
    }


def route_delta(before: dict, after: dict) -> dict[tuple[str, str], float]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


# ---- HTTP, with the official client ---------------------------------------------------------
def test_openai_completions_stream_and_not_match_the_engine(mesh, expected, tokenizer):
    client = mesh.openai()
    model = client.models.list().data[0].id
    text = tokenizer.decode(expected["prompt"])
    kw = dict(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    full = client.completions.create(**kw)
    assert full.choices[0].text == text
    assert full.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert full.usage.completion_tokens == len(expected["prompt"])
    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_openai_chat_stream_and_not_match_the_engine(mesh, expected, tokenizer):
    client = mesh.openai()
    model = client.models.list().data[0].id
    text = tokenizer.decode(expected["chat"])
    kw = dict(model=model, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0)
    full = client.chat.completions.create(**kw)
    assert full.choices[0].message.content == text
    assert full.usage.completion_tokens == len(expected["chat"])
    stream = client.chat.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_openai_long_prompt_is_routed_by_the_router_and_matches(mesh, expected, tokenizer):
    """No `disaggregate` knob over HTTP: the router itself sends a long prompt to prefill."""
    client = mesh.openai()
    before = routes(mesh)
    out = client.completions.create(
        model=client.models.list().data[0].id,
        prompt=LONG_PROMPT,
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    assert out.choices[0].text == tokenizer.decode(expected["long"])
    want = (
        ("disaggregated", "long_prompt") if disaggregated(mesh) else ("local", "no_prefill_workers")
    )
    assert route_delta(before, routes(mesh)) == {want: 1}


# ---- gRPC, token for token --------------------------------------------------------------------
def grpc_request(kind: str, disaggregate: bool | None) -> pb.GenerateRequest:
    req = pb.GenerateRequest(sampling=GREEDY)
    if kind == "chat":
        req.chat.messages.extend(pb.ChatMessage(**m) for m in CHAT)
    else:
        req.prompt = PROMPT
    if disaggregate is not None:
        req.disaggregate = disaggregate
    return req


def test_grpc_tokens_match_the_engine_on_both_paths(mesh, prompts, expected, tokenizer):
    stub = mesh.inference()
    modes = [True, False] if disaggregated(mesh) else [False, None]
    received = "kv_transfer_bytes_total"
    decode = mesh.workers_of("decode")
    pulled = mesh.worker_metric(decode[0], received, direction="received") if decode else 0.0
    before = routes(mesh)
    for kind in ("prompt", "chat"):
        for disaggregate in modes:
            responses = stub.Generate(grpc_request(kind, disaggregate), timeout=RPC_TIMEOUT_S)
            ids, text, usage, finish = stream_ids(responses)
            where = f"{kind}, disaggregate={disaggregate}"
            assert ids == expected[kind], where
            assert text == tokenizer.decode(ids), where
            assert usage.prompt_tokens == len(prompts[kind]), where
            assert usage.completion_tokens == len(ids), where
            assert finish in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP), where
    delta = route_delta(before, routes(mesh))
    if disaggregated(mesh):
        # Both paths really ran, and the prompts' KV really crossed from prefill to decode.
        assert delta == {("disaggregated", "requested"): 2, ("local", "requested"): 2}
        assert mesh.worker_metric(decode[0], received, direction="received") > pulled
        assert mesh.worker_metric(decode[0], "kv_transfer_fallbacks_total") == 0
    else:
        assert delta == {("local", "requested"): 2, ("local", "no_prefill_workers"): 2}


def test_concurrent_requests_are_batched_and_each_matches_the_engine(mesh, expected, tokenizer):
    """Six requests at once (half of them disaggregated on the disaggregated mesh): the
    decode worker runs several in one batch, and every answer is still the engine's."""
    stub = mesh.inference()
    decoder = (mesh.workers_of("decode") or mesh.workers_of("colocated"))[0]
    peak = [0]
    done = threading.Event()

    def watch() -> None:  # the decode worker's running batch, sampled while the batch runs
        while not done.is_set():
            peak[0] = max(peak[0], mesh.load(decoder).num_running)
            time.sleep(0.02)

    def one(i: int) -> tuple[list[int], str]:
        req = pb.GenerateRequest(sampling=GREEDY)
        req.chat.messages.extend(pb.ChatMessage(**m) for m in BATCH[i])
        if disaggregated(mesh):
            req.disaggregate = i % 2 == 0
        ids, text, _, _ = stream_ids(stub.Generate(req, timeout=RPC_TIMEOUT_S))
        return ids, text

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with ThreadPoolExecutor(len(BATCH)) as pool:
            results = list(pool.map(one, range(len(BATCH))))
    finally:
        done.set()
        watcher.join()
    for i, (ids, text) in enumerate(results):
        assert ids == expected[f"batch{i}"], f"request {i}"
        assert text == tokenizer.decode(ids), f"request {i}"
    assert peak[0] >= 2, "the decode worker never ran two requests in one batch"


def test_the_mesh_is_idle_afterwards(mesh):
    assert_idle(mesh)
