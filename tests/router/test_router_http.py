"""The router as a real process in front of real workers: a colocated worker and a prefill
worker (so both the local and the disaggregated path run), checked with the official `openai`
client, raw HTTP and the gRPC stubs. Greedy output must equal the in-process engine's for the
same token ids; every bad input gets its 4xx and the router keeps serving; SIGTERM exits 0.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import aiohttp
import grpc
import openai
import pytest
from ports import free_port
from router_testing import Service

from splitserve.engine.config import EngineConfig
from splitserve.engine.sampling_params import SamplingParams
from splitserve.executors.build import create_engine
from splitserve.model.loader import Checkpoint
from splitserve.v1 import pb, rpc

pytestmark = pytest.mark.slow

COMPLETION_PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name three colours."}]
# Over --disagg-min-tokens (256), so the router would disaggregate on its own too.
LONG_PROMPT = " ".join(f"Item {i} costs {i * 3} euros." for i in range(40))
MAX_TOKENS = 16
MIB = 1024 * 1024


@dataclass
class Mesh:
    router: Service
    http_port: int
    grpc_port: int
    decode_port: int
    reference: dict[str, list[int]]  # prompt name -> greedy token ids from the engine
    model: str = ""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="test-key", max_retries=0)


def reference_outputs(ckpt: Checkpoint) -> dict[str, list[int]]:
    """Greedy tokens from the engine in this process, for the prompts the tests send."""
    tok = ckpt.tokenizer
    assert tok is not None
    prompts = {
        "completion": tok.encode(COMPLETION_PROMPT),
        "chat": tok.encode(tok.apply_chat_template(CHAT), add_special_tokens=False),
        "long": tok.encode(LONG_PROMPT),
    }
    engine = create_engine(EngineConfig(kv_cache_memory_bytes=64 * MIB), ckpt)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    outs = engine.generate(list(prompts.values()), params)
    return {name: out.new_token_ids for name, out in zip(prompts, outs, strict=True)}


@pytest.fixture(scope="module")
def mesh(
    tmp_path_factory: pytest.TempPathFactory, smollm2_checkpoint: Checkpoint
) -> Iterator[Mesh]:
    logs = tmp_path_factory.mktemp("router-mesh")
    worker_args = ["--kv-cache-mib", "64", "--threads", "1", "--host", "127.0.0.1"]
    dport, pport, gport, hport = (free_port() for _ in range(4))
    services = [
        Service(
            "colocated",
            "splitserve.decode",
            ["--role", "colocated", "--port", str(dport), *worker_args],
            logs,
            dport,
        ),
        Service("prefill", "splitserve.prefill", ["--port", str(pport), *worker_args], logs, pport),
    ]
    router = Service(
        "router",
        "splitserve.router",
        [
            *("--grpc-port", str(gport), "--http-port", str(hport)),
            *("--colocated", f"127.0.0.1:{dport}", "--prefill", f"127.0.0.1:{pport}"),
            *("--health-interval", "0.5", "--drain-seconds", "5"),
            *("--internal-port", "0"),  # never the default: other tests may hold it
        ],
        logs,
        gport,
    )
    services.append(router)
    try:
        reference = reference_outputs(smollm2_checkpoint)  # while the workers load
        for service in services:
            service.wait_serving()
        mesh = Mesh(router, hport, gport, dport, reference)
        mesh.model = mesh.client().models.list().data[0].id
        wait_healthy(mesh)
        yield mesh
    finally:
        for service in services:
            service.stop()


def wait_healthy(mesh: Mesh, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if http_get(mesh, "/health")[0] == 200:
            return
        time.sleep(0.2)
    raise TimeoutError(f"router /health never 200:\n{mesh.router.log_tail()}")


def http_get(mesh: Mesh, path: str) -> tuple[int, str]:
    async def get() -> tuple[int, str]:
        async with aiohttp.ClientSession() as s, s.get(mesh.base_url + path) as r:
            return r.status, await r.text()

    return asyncio.run(get())


def http_post(mesh: Mesh, path: str, data: bytes) -> tuple[int, dict]:
    async def post() -> tuple[int, dict]:
        headers = {"Content-Type": "application/json"}
        async with (
            aiohttp.ClientSession() as s,
            s.post(mesh.base_url + path, data=data, headers=headers) as r,
        ):
            return r.status, await r.json()

    return asyncio.run(post())


def decode_text(ckpt: Checkpoint, ids: list[int]) -> str:
    assert ckpt.tokenizer is not None
    return ckpt.tokenizer.decode(ids)


# ---- happy paths ------------------------------------------------------------------------------
def test_completions_match_the_engine(mesh: Mesh, smollm2_checkpoint: Checkpoint) -> None:
    expected = decode_text(smollm2_checkpoint, mesh.reference["completion"])
    client = mesh.client()
    kw = dict(model=mesh.model, prompt=COMPLETION_PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    full = client.completions.create(**kw)
    assert full.choices[0].text == expected
    assert full.usage.completion_tokens == len(mesh.reference["completion"])
    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_chat_stream_and_not_match_the_engine(mesh: Mesh, smollm2_checkpoint: Checkpoint) -> None:
    expected = decode_text(smollm2_checkpoint, mesh.reference["chat"])
    client = mesh.client()
    kw = dict(model=mesh.model, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0)
    full = client.chat.completions.create(**kw, logprobs=True, top_logprobs=2)
    assert full.choices[0].message.content == expected
    assert full.choices[0].message.role == "assistant"
    lps = full.choices[0].logprobs.content
    assert len(lps) == full.usage.completion_tokens and len(lps[0].top_logprobs) == 2
    stream = client.chat.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_grpc_local_and_disaggregated_match_the_engine(mesh: Mesh) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{mesh.grpc_port}") as channel:
        stub = rpc.InferenceStub(channel)
        sampling = pb.SamplingOptions(max_tokens=MAX_TOKENS, temperature=0)
        for disaggregate in (False, True):
            request = pb.GenerateRequest(
                prompt=LONG_PROMPT, sampling=sampling, disaggregate=disaggregate
            )
            out = list(stub.Generate(request, timeout=120))
            ids = [t for r in out for t in r.token_ids]
            assert ids == mesh.reference["long"], f"disaggregate={disaggregate}"
            assert out[-1].usage.completion_tokens == len(ids) and out[-1].finish_reason
        (card,) = stub.ListModels(pb.ListModelsRequest(), timeout=5).models
        assert card.id == mesh.model and card.max_model_len > 0
    status, body = http_get(mesh, "/metrics")
    assert status == 200
    assert 'mode="disaggregated"' in body and 'mode="local"' in body


def test_models_health_and_metrics(mesh: Mesh) -> None:
    status, body = http_get(mesh, "/v1/models")
    assert status == 200 and json.loads(body)["data"][0]["id"] == mesh.model
    status, body = http_get(mesh, "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, body = http_get(mesh, "/metrics")
    for name in (
        "splitserve_router_requests_total",
        "splitserve_router_time_to_first_token_seconds",
        "splitserve_router_inter_token_latency_seconds",
        "splitserve_router_requests_in_flight",
        "splitserve_router_worker_outstanding_tokens",
        "splitserve_router_routing_decisions_total",
    ):
        assert name in body, name


# ---- bad inputs -------------------------------------------------------------------------------
def test_bad_inputs_get_4xx_and_the_router_keeps_serving(mesh: Mesh) -> None:
    client = mesh.client()
    ok = dict(model=mesh.model, prompt="Hi", max_tokens=2)
    over_context = "hello " * 9000  # more tokens than the model's 8192 context
    cases = [
        (dict(ok, prompt=""), openai.BadRequestError),
        (dict(ok, prompt=over_context), openai.BadRequestError),
        (dict(ok, max_tokens=0), openai.BadRequestError),
        (dict(ok, max_tokens=10**9), openai.BadRequestError),
        (dict(ok, model="no-such-model"), openai.NotFoundError),
        (dict(ok, temperature=-1), openai.BadRequestError),
        (dict(ok, top_p=0), openai.BadRequestError),
        (dict(ok, top_p=1.5), openai.BadRequestError),
        (dict(ok, n=17), openai.BadRequestError),
    ]
    for kwargs, error in cases:
        with pytest.raises(error) as info:
            client.completions.create(**kwargs)
        body = info.value.body
        assert body["type"] == "invalid_request_error" and body["message"], kwargs
    status, body = http_post(mesh, "/v1/completions", b'{"prompt": "Hi", ')
    assert status == 400 and body["error"]["code"] == "invalid_json"
    assert client.completions.create(**ok).choices[0].finish_reason == "length"


def post_raw(mesh: Mesh, path: str, data: bytes, content_type: str) -> tuple[int, dict]:
    async def post() -> tuple[int, dict]:
        headers = {"Content-Type": content_type}
        async with (
            aiohttp.ClientSession() as s,
            s.post(mesh.base_url + path, data=data, headers=headers) as r,
        ):
            return r.status, await r.json(content_type=None)

    return asyncio.run(post())


def test_issue_14s_odd_inputs_get_4xx(mesh: Mesh) -> None:
    """Each used to reach "internal error in the router"."""
    json_type = "application/json"
    chat = '"messages": [{"role": "user", "content": "Hi"}]'
    cases = [
        ("/v1/completions", b'{"prompt": "\\ud800"}', json_type, 400),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
            json_type,
            400,
        ),
        ("/v1/completions", b"[" * 100_000 + b"]" * 100_000, json_type, 400),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": ["user"], "content": "Hi"}]}',
            json_type,
            400,
        ),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": {"a": 1}, "content": "Hi"}]}',
            json_type,
            400,
        ),
        (
            "/v1/chat/completions",
            b"{" + chat.encode() + b', "response_format": "json"}',
            json_type,
            400,
        ),
        (
            "/v1/completions",
            b'{"prompt": "Hi", "top_k": 1000000000000000000000000000000}',
            json_type,
            400,
        ),
        ("/v1/completions", b'{"prompt": "Hi", "temperature": NaN}', json_type, 400),
        ("/v1/completions", b'{"prompt": "Hi", "top_p": Infinity}', json_type, 400),
        ("/v1/completions", b'{"prompt": "Hi", "timeout": 1' + b"0" * 400 + b"}", json_type, 400),
        (
            "/v1/completions",
            b'{"prompt": "Hi", "stream": true, "stream_options": 3}',
            json_type,
            400,
        ),
        ("/v1/completions", '{"prompt": "caf\u00e9"}'.encode("utf-16"), json_type, 400),
        ("/v1/completions", b'{"prompt": "\xff"}', json_type, 400),
        ("/v1/completions", b'{"prompt": "Hi"}', "application/x-www-form-urlencoded", 415),
        ("/v1/completions", b'{"prompt": "Hi"}', "text/plain", 415),
    ]
    for path, data, content_type, status in cases:
        got, body = post_raw(mesh, path, data, content_type)
        assert got == status, (data[:80], got, body)
        assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"]
    ok = b'{"prompt": "Hi", "max_tokens": 2}'
    assert post_raw(mesh, "/v1/completions", ok, "application/json; charset=utf-8")[0] == 200
    assert "internal error" not in mesh.router.log_tail(100_000)


def test_a_100mb_body_gets_413_without_being_read(mesh: Mesh) -> None:
    """Content-Length alone decides: send the headers and 1 MiB of a 100 MB body, then read."""
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {100 * 1000 * 1000}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", mesh.http_port), timeout=10) as s:
        s.sendall(head + b'{"prompt": "' + b"x" * MIB)
        reply = s.recv(65536).decode(errors="replace")
    assert reply.startswith("HTTP/1.1 413"), reply[:200]
    assert '"request_too_large"' in reply
    # And a real 100 MB upload, as a client would send it.
    body = b'{"prompt": "' + b"x" * (100 * MIB) + b'"}'
    status, payload = http_post(mesh, "/v1/completions", body)
    assert status == 413 and payload["error"]["type"] == "invalid_request_error"
    assert mesh.client().completions.create(model=mesh.model, prompt="Hi", max_tokens=2)


# ---- cancellation and shutdown ---------------------------------------------------------------
def test_a_client_leaving_mid_stream_frees_the_worker(mesh: Mesh) -> None:
    async def leave_early() -> None:
        body = {"prompt": "Once upon a time", "max_tokens": 500, "ignore_eos": True, "stream": True}
        async with aiohttp.ClientSession() as s:
            r = await s.post(mesh.base_url + "/v1/completions", json=body)
            seen = 0
            async for line in r.content:
                seen += line.startswith(b"data:")
                if seen == 3:
                    break
            r.close()

    asyncio.run(leave_early())
    with grpc.insecure_channel(f"127.0.0.1:{mesh.decode_port}") as channel:
        stub = rpc.DecodeStub(channel)
        deadline = time.monotonic() + 10
        while stub.GetLoad(pb.LoadRequest(), timeout=5).num_running and time.monotonic() < deadline:
            time.sleep(0.1)
        assert stub.GetLoad(pb.LoadRequest(), timeout=5).num_running == 0
    status, body = http_get(mesh, "/metrics")
    assert status == 200
    outstanding = [x for x in body.splitlines() if x.startswith("splitserve_router_worker_out")]
    assert outstanding and all(x.endswith(" 0.0") for x in outstanding), outstanding


# ---- the OpenAI surface (issue 15): n, best_of, logit_bias, echo, prompt lists, tokenize ------
def completion(mesh: Mesh, body: dict) -> dict:
    status, out = http_post(
        mesh, "/v1/completions", json.dumps({"model": mesh.model, **body}).encode()
    )
    assert status == 200, out
    return out


def grpc_generate(mesh: Mesh, request: pb.GenerateRequest) -> dict[int, list[pb.GenerateResponse]]:
    with grpc.insecure_channel(f"127.0.0.1:{mesh.grpc_port}") as channel:
        out: dict[int, list[pb.GenerateResponse]] = {}
        for r in rpc.InferenceStub(channel).Generate(request, timeout=120):
            out.setdefault(r.index, []).append(r)
        return out


def test_n_with_a_seed_is_n_requests_with_seeds_seed_plus_i(mesh: Mesh) -> None:
    """Colocated (short prompt), disaggregated (long prompt over HTTP, and forced over gRPC);
    the choices of the long prompt share its blocks (cached_tokens)."""
    salt = f"n-{time.monotonic_ns()}"  # a prompt no request computed before
    for prompt in (COMPLETION_PROMPT, LONG_PROMPT):
        kw = {"prompt": prompt, "max_tokens": 4, "temperature": 1.0}
        many = completion(mesh, {**kw, "n": 4, "seed": 11, "cache_salt": salt})
        texts = [c["text"] for c in sorted(many["choices"], key=lambda c: c["index"])]
        alone = [completion(mesh, {**kw, "seed": 11 + j})["choices"][0]["text"] for j in range(4)]
        assert texts == alone and len(set(texts)) > 1
        usage = many["usage"]
        assert usage["completion_tokens"] == 4 * 4
    assert usage["prompt_tokens_details"]["cached_tokens"] >= usage["prompt_tokens"] - 16
    sampling = pb.SamplingOptions(max_tokens=4, temperature=1.0, seed=11)
    request = pb.GenerateRequest(prompt=LONG_PROMPT, n=4, sampling=sampling, disaggregate=True)
    by_choice = grpc_generate(mesh, request)
    assert ["".join(r.text for r in by_choice[j]) for j in range(4)] == alone


def test_best_of_returns_the_likeliest_and_chat_streams_n(mesh: Mesh) -> None:
    kw = {"prompt": COMPLETION_PROMPT, "max_tokens": 5, "temperature": 1.0}
    best = completion(mesh, {**kw, "best_of": 3, "seed": 5})["choices"]
    assert len(best) == 1 and best[0]["logprobs"] is None
    scored = []
    for j in range(3):
        c = completion(mesh, {**kw, "seed": 5 + j, "logprobs": 0})["choices"][0]
        scored.append((sum(c["logprobs"]["token_logprobs"]), c["text"]))
    assert best[0]["text"] == max(scored)[1]
    client = mesh.client()
    chat = dict(model=mesh.model, messages=CHAT, max_tokens=5, temperature=1.0, seed=3, n=2)
    full = client.chat.completions.create(**chat)
    streamed = ["", ""]
    for chunk in client.chat.completions.create(**chat, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert streamed == [c.message.content for c in full.choices]


def test_logit_bias_bans_and_forces_tokens(mesh: Mesh) -> None:
    first = mesh.reference["completion"][0]
    kw = {"prompt": COMPLETION_PROMPT, "max_tokens": 3, "temperature": 0, "logprobs": 0}
    banned = completion(mesh, {**kw, "logit_bias": {str(first): -100}})["choices"][0]
    assert banned["logprobs"]["tokens"][0] != decode_text_of(mesh, first)
    forced_id = mesh.reference["completion"][1]
    for prompt in (COMPLETION_PROMPT, LONG_PROMPT):  # local, disaggregated (prefill samples)
        kw = {"prompt": prompt, "max_tokens": 3, "temperature": 0.7, "seed": 1}
        forced = completion(mesh, {**kw, "logit_bias": {str(forced_id): 100}})
        assert forced["choices"][0]["text"] == decode_text_of(mesh, forced_id) * 3


def decode_text_of(mesh: Mesh, token_id: int) -> str:
    status, out = http_post(mesh, "/detokenize", json.dumps({"tokens": [token_id]}).encode())
    assert status == 200
    return out["prompt"]


def test_lm_eval_loglikelihood_shape_echo_and_prompt_logprobs(mesh: Mesh) -> None:
    """What lm-evaluation-harness's local-completions sends for loglikelihood: token prompts in
    a list, echo, logprobs 1, max_tokens 1 (and 0); colocated, disaggregated and cached agree."""
    _, tok = http_post(mesh, "/tokenize", json.dumps({"prompt": LONG_PROMPT}).encode())
    long_ids = tok["tokens"]
    prompts = [mesh_tokens(mesh, COMPLETION_PROMPT), long_ids[:40]]
    body = {"prompt": prompts, "echo": True, "logprobs": 1, "temperature": 0, "seed": 1234}
    one = completion(mesh, {**body, "max_tokens": 1})
    zero = completion(mesh, {**body, "max_tokens": 0})
    assert zero["usage"]["completion_tokens"] == 0 and one["usage"]["completion_tokens"] == 2
    for i, ids in enumerate(prompts):
        a, z = one["choices"][i]["logprobs"], zero["choices"][i]["logprobs"]
        assert len(a["tokens"]) == len(ids) + 1 and len(z["tokens"]) == len(ids)
        assert a["token_logprobs"][0] is None and a["top_logprobs"][0] is None
        assert a["token_logprobs"][:-1] == pytest.approx(z["token_logprobs"], abs=1e-5)
        assert all(len(t) >= 1 for t in a["top_logprobs"][1:])
        assert one["choices"][i]["text"].startswith(zero["choices"][i]["text"])
    sampling = pb.SamplingOptions(max_tokens=1, temperature=0, logprobs=1)
    request = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=prompts[1]), sampling=sampling, echo=True, disaggregate=True
    )
    (first, *_) = grpc_generate(mesh, request)[0]
    remote = [lp.logprob for lp in first.prompt_logprobs][1:]
    local = zero["choices"][1]["logprobs"]["token_logprobs"][1:]
    assert list(first.prompt_token_ids) == prompts[1] and remote == pytest.approx(local, abs=1e-4)


def mesh_tokens(mesh: Mesh, text: str) -> list[int]:
    status, out = http_post(mesh, "/tokenize", json.dumps({"prompt": text}).encode())
    assert status == 200 and out["count"] == len(out["tokens"])
    return out["tokens"]


def test_tokenize_and_detokenize(mesh: Mesh, smollm2_checkpoint: Checkpoint) -> None:
    tok = smollm2_checkpoint.tokenizer
    assert tok is not None
    assert mesh_tokens(mesh, COMPLETION_PROMPT) == tok.encode(COMPLETION_PROMPT)
    body = {"messages": CHAT, "return_token_strs": True}
    status, out = http_post(mesh, "/tokenize", json.dumps(body).encode())
    assert status == 200
    assert out["tokens"] == tok.encode(tok.apply_chat_template(CHAT), add_special_tokens=False)
    assert "".join(out["token_strs"]) == tok.apply_chat_template(CHAT)
    status, back = http_post(mesh, "/detokenize", json.dumps({"tokens": out["tokens"]}).encode())
    assert status == 200 and back["prompt"] == tok.decode(out["tokens"])
    status, err = http_post(mesh, "/detokenize", json.dumps({"tokens": [10**9]}).encode())
    assert status == 400 and err["error"]["param"] == "tokens"
    status, info = http_get(mesh, "/tokenizer_info")  # lm-eval's `remote` tokenizer reads it
    info = json.loads(info)
    assert status == 200 and info["eos_token"] == tok.eos_token and info["chat_template"]


def test_abort_by_the_request_id_stops_every_choice(mesh: Mesh) -> None:
    sampling = pb.SamplingOptions(max_tokens=400, temperature=1.0, seed=1, ignore_eos=True)
    request = pb.GenerateRequest(request_id="abort-n", prompt="Count:", n=2, sampling=sampling)
    with grpc.insecure_channel(f"127.0.0.1:{mesh.grpc_port}") as channel:
        stub = rpc.InferenceStub(channel)
        stream = stub.Generate(request, timeout=120)
        seen = {r.index for r in itertools.takewhile(lambda r: r.index != 1, stream)}
        assert seen == {0}  # choice 1 streams too now: both are running
        assert stub.Abort(pb.AbortRequest(request_id="abort-n"), timeout=5).found
        ends = {r.index: r.finish_reason for r in stream if r.finish_reason}
    assert ends == {0: pb.FINISH_REASON_ABORT, 1: pb.FINISH_REASON_ABORT}


def test_bad_surface_inputs_name_their_param_on_both_doors(mesh: Mesh) -> None:
    ok = {"model": mesh.model, "prompt": "Hi", "max_tokens": 2}
    cases = [
        ({**ok, "n": 17}, "n"),
        ({**ok, "n": 3, "best_of": 2}, "best_of"),
        ({**ok, "logit_bias": {"5": 100.5}}, "logit_bias"),
        ({**ok, "logit_bias": {str(10**7): 1}}, "logit_bias"),
        ({**ok, "prompt": ["a", 7]}, "prompt"),
    ]
    for body, param in cases:
        status, err = http_post(mesh, "/v1/completions", json.dumps(body).encode())
        assert (status, err["error"]["param"]) == (400, param), body
    chat = {"model": mesh.model, "messages": CHAT, "echo": True}
    status, err = http_post(mesh, "/v1/chat/completions", json.dumps(chat).encode())
    assert (status, err["error"]["param"]) == (400, "echo")
    bias = pb.SamplingOptions(max_tokens=2)
    bias.logit_bias[10**7] = 1.0
    chat_msgs = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")])
    bad = [
        pb.GenerateRequest(prompt="Hi", n=17),
        pb.GenerateRequest(prompt="Hi", n=3, best_of=2),
        pb.GenerateRequest(prompt="Hi", sampling=bias),
        pb.GenerateRequest(chat=chat_msgs, echo=True),
    ]
    for request in bad:
        with pytest.raises(grpc.RpcError) as info:
            grpc_generate(mesh, request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert completion(mesh, ok)["choices"][0]["finish_reason"]  # still serving


def test_a_list_of_prompts_over_grpc_is_the_same_list_over_http(mesh: Mesh) -> None:
    """GenerateRequest.prompts and .token_id_lists: choice i * n + j of prompt i, the text HTTP
    gives that choice of the same list with the same seed (the long prompt disaggregated)."""
    prompts = [COMPLETION_PROMPT, "Once upon a time", LONG_PROMPT]
    kw = {"max_tokens": 4, "temperature": 1.0, "seed": 7, "n": 2}
    http = completion(mesh, {**kw, "prompt": prompts})
    expected = [c["text"] for c in sorted(http["choices"], key=lambda c: c["index"])]
    assert len(expected) == 6 and len(set(expected)) > 1
    sampling = pb.SamplingOptions(max_tokens=4, temperature=1.0, seed=7)
    ids = [mesh_tokens(mesh, p) for p in prompts]
    for request in (
        pb.GenerateRequest(prompts=pb.PromptList(texts=prompts), n=2, sampling=sampling),
        pb.GenerateRequest(
            token_id_lists=pb.TokenIdsList(lists=[pb.TokenIds(ids=i) for i in ids]),
            n=2,
            sampling=sampling,
        ),
    ):
        by_index = grpc_generate(mesh, request)
        assert sorted(by_index) == list(range(6)), request.WhichOneof("input")
        assert ["".join(r.text for r in by_index[i]) for i in range(6)] == expected
        for i in range(6):  # each choice ends once, with the usage of its own prompt
            (last,) = [r for r in by_index[i] if r.finish_reason]
            assert last.usage.prompt_tokens == len(ids[i // 2])


def test_bad_prompt_lists_name_their_field_on_both_doors(mesh: Mesh) -> None:
    """Empty, too long, an empty element, an element out of the vocabulary: 400 naming
    `prompt` (and the element) over HTTP, INVALID_ARGUMENT naming the field over gRPC; then
    both doors still serve."""
    http_cases = [
        ([], "prompt must not be empty"),
        (["a"] * 257, "prompt may hold at most 256 prompts; got 257"),
        (["a", ""], "prompt[1] must not be empty"),
        ([[1, 2], []], "prompt[1] must not be empty"),
        ([[1, 2], [10**7]], "prompt[1]: token ids must be in"),
    ]
    for prompt, message in http_cases:
        body = {"model": mesh.model, "prompt": prompt, "max_tokens": 2}
        status, err = http_post(mesh, "/v1/completions", json.dumps(body).encode())
        assert (status, err["error"]["param"]) == (400, "prompt"), prompt
        assert err["error"]["message"].startswith(message), err
    ids = pb.TokenIds(ids=[1, 2])
    grpc_cases = [
        (pb.GenerateRequest(prompts=pb.PromptList()), "prompts must not be empty"),
        (
            pb.GenerateRequest(prompts=pb.PromptList(texts=["a"] * 257)),
            "prompts may hold at most 256 prompts; got 257",
        ),
        (pb.GenerateRequest(prompts=pb.PromptList(texts=["a", ""])), "prompts[1] must not be"),
        (
            pb.GenerateRequest(token_id_lists=pb.TokenIdsList(lists=[ids, pb.TokenIds()])),
            "token_id_lists[1] must not be empty",
        ),
        (
            pb.GenerateRequest(
                token_id_lists=pb.TokenIdsList(lists=[ids, pb.TokenIds(ids=[10**7])])
            ),
            "token_id_lists[1]: token ids must be in",
        ),
        (
            pb.GenerateRequest(prompts=pb.PromptList(texts=["a"]), tools_json="[]"),
            "tools need chat messages",
        ),
    ]
    for request, message in grpc_cases:
        assert request.WhichOneof("input") in ("prompts", "token_id_lists")
        with pytest.raises(grpc.RpcError) as info:
            grpc_generate(mesh, request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
        assert info.value.details().startswith(message), info.value.details()
    sampling = pb.SamplingOptions(max_tokens=2)
    ok = grpc_generate(
        mesh, pb.GenerateRequest(prompts=pb.PromptList(texts=["Hi"]), sampling=sampling)
    )
    assert list(ok) == [0] and ok[0][-1].finish_reason
    assert completion(mesh, {"prompt": ["Hi", "Yo"], "max_tokens": 2})["choices"][1]["text"]


def test_best_of_over_n_streams_buffered_on_both_doors(mesh: Mesh) -> None:
    """best_of > n with stream: served (as vLLM does), not refused; nothing streams until every
    candidate has finished, then each winner's deltas one after another (indices never go
    back), the same winners and text as without stream; and over gRPC, whose Generate always
    streams, the same."""
    body = {"prompt": COMPLETION_PROMPT, "max_tokens": 5, "temperature": 1.0, "seed": 5}
    body |= {"n": 2, "best_of": 3}
    whole = completion(mesh, body)
    expected = [c["text"] for c in sorted(whole["choices"], key=lambda c: c["index"])]
    chunks = list(mesh.client().completions.create(model=mesh.model, stream=True, **body))
    indices = [c.choices[0].index for c in chunks if c.choices]
    assert indices == sorted(indices) and set(indices) == {0, 1}  # one winner, then the other
    streamed = ["", ""]
    for c in chunks:
        for choice in c.choices:
            streamed[choice.index] += choice.text
    assert streamed == expected
    sampling = pb.SamplingOptions(max_tokens=5, temperature=1.0, seed=5)
    request = pb.GenerateRequest(prompt=COMPLETION_PROMPT, n=2, best_of=3, sampling=sampling)
    with grpc.insecure_channel(f"127.0.0.1:{mesh.grpc_port}") as channel:
        replies = list(rpc.InferenceStub(channel).Generate(request, timeout=120))
    assert [r.index for r in replies] == sorted(r.index for r in replies)
    assert ["".join(r.text for r in replies if r.index == i) for i in (0, 1)] == expected


def test_sigterm_drains_and_exits_zero(mesh: Mesh) -> None:
    """Last in this module: the router goes away."""
    assert mesh.router.stop() == 0
    assert "stopped" in mesh.router.log_tail()
