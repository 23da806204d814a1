"""API keys on both public doors, and the tenant they make.

Unit tests of router/auth.py (key sources, the refusal to serve an open non-loopback door,
constant-time matching, tenants, the per-key limit, rate-limited logging), the /metrics flag
on an in-process HttpApi, and a real router process with API keys in front of a real
colocated worker (the tiny random model): without a key or with a wrong one -> 401 /
UNAUTHENTICATED, with one -> served on HTTP and gRPC; /health and gRPC health stay open; two
keys never share prefix-cache blocks (B's cached_tokens says nothing about A's prompt); a
tenant can't abort another's request, and two may use the same request id; one key past
--max-inflight-per-key gets 429.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ports import free_port
from router_testing import Service

from splitserve.model.loader import Checkpoint
from splitserve.router import auth as auth_module
from splitserve.router.app import Router, RouterConfig
from splitserve.router.auth import (
    ENV_API_KEYS,
    Authenticator,
    RateLimitedLog,
    add_auth_arguments,
    front_door_from_args,
    is_loopback,
    load_api_keys,
    tenant_of,
)
from splitserve.router.errors import AuthenticationError, OverloadedError
from splitserve.router.http_api import HttpApi
from splitserve.router.openai_protocol import parse_completion
from splitserve.router.validation import ModelInfo, RequestValidator
from splitserve.v1 import pb, rpc

ALICE, BOB = "sk-alice-0123456789", "sk-bob-9876543210"


# ---- keys and configuration -------------------------------------------------------------------
def test_keys_come_from_flags_file_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# the team's keys\n\n  {BOB}  \n# {ALICE} is commented out\nsk-carol\n")
    keys = load_api_keys([ALICE, " "], str(path), f" sk-dave, ,{ALICE}")
    assert keys == [ALICE, BOB, "sk-carol", "sk-dave"]
    assert load_api_keys() == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "No such file"),
        ("# only a comment\n\n", "no key in it"),
        (b"\xff\xfe", "cannot read"),
    ],
)
def test_a_bad_key_file_is_a_one_line_error(
    tmp_path: Path, content: str | bytes | None, message: str
) -> None:
    path = tmp_path / "keys"
    if isinstance(content, str):
        path.write_text(content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        load_api_keys([], str(path))
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_a_key_must_be_printable_ascii_without_spaces() -> None:
    for bad in ["two words", "tab\there", "ключ", "nul\x00"]:
        with pytest.raises(ValueError, match="printable ASCII"):
            load_api_keys([bad])


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    add_auth_arguments(p)
    return p.parse_args(argv)


def test_an_open_door_on_a_public_address_needs_saying_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(ENV_API_KEYS, raising=False)
    with pytest.raises(ValueError, match="--allow-unauthenticated") as info:
        front_door_from_args(parse(["--host", "0.0.0.0"]))
    assert "\n" not in str(info.value)
    assert not front_door_from_args(
        parse(["--host", "0.0.0.0", "--allow-unauthenticated"])
    ).auth.enabled
    assert not front_door_from_args(parse([])).auth.enabled  # loopback: fine without a key
    assert front_door_from_args(parse(["--host", "0.0.0.0", "--api-key", ALICE])).auth.enabled
    monkeypatch.setenv(ENV_API_KEYS, f"{ALICE},{BOB}")
    front = front_door_from_args(parse(["--host", "::", "--http-max-connections", "7"]))
    assert front.auth.num_keys == 2 and front.http.max_connections == 7
    for bad in (["--http-header-timeout-s", "0"], ["--http-max-connections", "0"]):
        with pytest.raises(ValueError):
            front_door_from_args(parse(bad))


def test_loopback_addresses() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.8.9.1", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.1", "", "example.com"]))


def test_the_router_refuses_to_start_open_on_a_public_address(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != ENV_API_KEYS}
    for args, message in [
        (["--host", "0.0.0.0"], "--allow-unauthenticated"),
        (["--api-key-file", str(tmp_path / "missing")], "--api-key-file"),
    ]:
        proc = subprocess.run(
            [sys.executable, "-m", "splitserve.router", *args, "--grpc-port", "0"],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert proc.returncode == 2, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if "error" in line]
        assert len(lines) == 1 and message in lines[0], proc.stderr


# ---- matching -----------------------------------------------------------------------------------
def test_keys_are_checked_as_bearer_tokens() -> None:
    auth = Authenticator([ALICE, BOB])
    assert auth.authenticate(f"Bearer {ALICE}") == tenant_of(ALICE)
    assert auth.authenticate(f"bearer   {BOB} ") == tenant_of(BOB)
    assert auth.authenticate(BOB, allow_bare=True) == tenant_of(BOB)  # gRPC metadata
    for credential in [None, "", "Bearer", BOB, f"Basic {BOB}", f"Bearer {ALICE}x", "Bearer x"]:
        with pytest.raises(AuthenticationError) as info:
            auth.authenticate(credential)
        err = info.value
        assert err.http_status == 401 and err.grpc_code == grpc.StatusCode.UNAUTHENTICATED
        body = err.openai_body()["error"]
        assert body["type"] == "invalid_request_error" and body["code"] == "invalid_api_key"
        assert ALICE not in err.message and BOB not in err.message
    assert Authenticator().authenticate(None) is None  # off: anyone
    assert Authenticator().authenticate("Bearer whatever") is None


def test_every_key_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """hmac.compare_digest against every configured key, on equal-length digests, whether the
    first key matches, the last, or none: the work never depends on which."""
    calls: list[tuple[int, int]] = []
    compare = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return compare(a, b)

    monkeypatch.setattr(auth_module.hmac, "compare_digest", counting)
    keys = [ALICE, BOB, "sk-carol"]
    auth = Authenticator(keys)
    for presented in [ALICE, "sk-carol", "x", "y" * 5000]:
        calls.clear()
        auth.match(presented)
        assert calls == [(32, 32)] * len(keys), presented


def test_tenants_are_per_key_and_never_the_key() -> None:
    alice, bob = tenant_of(ALICE), tenant_of(BOB)
    assert alice == tenant_of(ALICE) and alice != bob
    assert len(alice) == 32 and int(alice, 16) >= 0 and ALICE not in alice


def test_the_tenant_is_the_cache_salt(smollm2_checkpoint: Checkpoint) -> None:
    """With a key, the salt is its tenant (a caller's cache_salt only narrows it), whatever
    else the caller sends; equal for the same key, different for different keys."""
    cfg = smollm2_checkpoint.config
    assert smollm2_checkpoint.tokenizer is not None
    validator = RequestValidator(
        ModelInfo("m", 64, cfg.vocab_size), smollm2_checkpoint.tokenizer, 4096
    )

    def salt(key: str, cache_salt: str | None = None, header: str | None = None) -> str | None:
        raw = parse_completion({"prompt": "Hi", "cache_salt": cache_salt}, 20, header).raw
        raw.tenant = tenant_of(key)
        return asyncio.run(validator.validate(raw)).cache_salt

    alice, bob = salt(ALICE), salt(BOB)
    assert alice == tenant_of(ALICE) and bob == tenant_of(BOB) and alice != bob
    assert salt(ALICE, header="Bearer something-else") == alice
    assert salt(ALICE, "mine") == f"{alice}:mine" != salt(BOB, "mine")


def test_one_key_past_its_inflight_limit_gets_429() -> None:
    auth = Authenticator([ALICE, BOB], max_inflight_per_key=1)
    alice, bob = tenant_of(ALICE), tenant_of(BOB)
    with auth.admit(alice):
        with pytest.raises(OverloadedError), auth.admit(alice):
            pass
        with auth.admit(bob):  # another key is not affected
            pass
    with auth.admit(alice):  # the slot came back
        pass
    with Authenticator([ALICE]).admit(alice), Authenticator([ALICE]).admit(alice):
        pass  # no limit by default


def test_refusals_are_logged_rate_limited_and_without_the_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    auth = Authenticator([ALICE])
    with caplog.at_level(logging.WARNING, logger="splitserve.router"):
        for _ in range(50):
            with pytest.raises(AuthenticationError):
                auth.authenticate("Bearer sk-guess-123")
    lines = [r.getMessage() for r in caplog.records if "API key" in r.getMessage()]
    assert len(lines) == 1 and auth.refusals.total == 50
    assert "sk-guess-123" not in lines[0] and ALICE not in lines[0]


def test_rate_limited_log_reports_the_count_since_the_last_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    events = RateLimitedLog("things happened", interval_s=0.0)
    with caplog.at_level(logging.WARNING, logger="splitserve.router"):
        events.hit()
        events.hit("detail")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "1 time(s)" in messages[1] and "2 in all" in messages[1]
    assert "(detail)" in messages[1]


def test_rate_limited_log_reports_what_it_held_back_when_the_interval_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    events = RateLimitedLog("slow things", interval_s=0.2)

    async def burst() -> None:
        for _ in range(5):
            events.hit()
        for _ in range(100):  # the timer fires once the interval is over
            await asyncio.sleep(0.05)
            if len(caplog.records) == 2:
                break

    with caplog.at_level(logging.WARNING, logger="splitserve.router"):
        asyncio.run(burst())
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "1 time(s)" in messages[0] and "4 time(s)" in messages[1] and "5 in all" in messages[1]


# ---- /metrics and /health on an in-process door -----------------------------------------------
@pytest.mark.parametrize("metrics_require_key", [False, True])
def test_health_is_open_and_metrics_per_flag(
    smollm2_checkpoint: Checkpoint, metrics_require_key: bool
) -> None:
    import aiohttp

    router = Router(RouterConfig(), smollm2_checkpoint)
    auth = Authenticator([ALICE], metrics_require_key=metrics_require_key)
    api = HttpApi(router, "127.0.0.1", 0, auth=auth)

    async def run() -> dict[str, int]:
        await api.start()
        url = f"http://127.0.0.1:{api.bound_port()}"
        key = {"Authorization": f"Bearer {ALICE}"}
        out = {}
        try:
            async with aiohttp.ClientSession() as s:
                for name, path, headers in [
                    ("health", "/health", {}),
                    ("metrics", "/metrics", {}),
                    ("metrics+key", "/metrics", key),
                    ("models", "/v1/models", {}),
                    ("models+key", "/v1/models", key),
                    ("unknown", "/v1/nothing", {}),
                ]:
                    async with s.get(url + path, headers=headers) as r:
                        out[name] = r.status
                        if r.status == 401:
                            assert r.headers["WWW-Authenticate"] == "Bearer"
                            body = await r.json()
                            assert body["error"]["code"] == "invalid_api_key"
        finally:
            await api.stop()
            await router.close()
        return out

    statuses = asyncio.run(run())
    assert statuses["health"] == 503  # open (no worker, so 503, not 401)
    assert statuses["metrics"] == (401 if metrics_require_key else 200)
    assert statuses["metrics+key"] == 200
    assert statuses["models"] == 401 and statuses["models+key"] == 200
    assert statuses["unknown"] == 401  # no key: not even which paths exist


# ---- a real router with keys, in front of a real worker ----------------------------------------
@dataclass
class Mesh:
    router: Service
    http_port: int
    grpc_port: int

    def post(
        self, path: str, body: dict[str, Any], key: str | None = ALICE
    ) -> tuple[int, dict[str, str], dict[str, Any]]:
        import urllib.error
        import urllib.request

        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        url = f"http://127.0.0.1:{self.http_port}{path}"
        req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, dict(r.headers), json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), json.loads(e.read())

    def get(self, path: str) -> int:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=30):
                return 200
        except urllib.error.HTTPError as e:
            return e.code


@pytest.fixture(scope="module")
def mesh(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    logs = tmp_path_factory.mktemp("auth-mesh")
    keys = logs / "keys"
    keys.write_text(f"# bob's key\n{BOB}\n")
    wport, gport, hport, iport = (free_port() for _ in range(4))
    worker_args = ["--role", "colocated", "--port", str(wport), "--model", tiny_model_dir]
    worker_args += ["--kv-cache-mib", "32", "--threads", "1"]
    worker = Service("colocated", "splitserve.decode", worker_args, logs, wport)
    router = Service(
        "router",
        "splitserve.router",
        [
            *("--grpc-port", str(gport), "--http-port", str(hport)),
            *("--internal-port", str(iport), "--model", tiny_model_dir),
            *("--colocated", f"127.0.0.1:{wport}", "--health-interval", "0.5"),
            *("--api-key", ALICE, "--api-key-file", str(keys), "--max-inflight-per-key", "1"),
        ],
        logs,
        gport,
    )
    try:
        worker.wait_serving()
        router.wait_serving()
        mesh = Mesh(router, hport, gport)
        deadline = time.monotonic() + 60
        while mesh.get("/health") != 200:
            assert time.monotonic() < deadline, router.log_tail()
            time.sleep(0.2)
        yield mesh
    finally:
        router.stop()
        worker.stop()


COMPLETION = {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}


def test_http_needs_a_key(mesh: Mesh) -> None:
    for key in (None, "sk-wrong", ALICE + "x"):
        status, headers, body = mesh.post("/v1/completions", COMPLETION, key)
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer", body
        assert body["error"]["type"] == "invalid_request_error"
        assert body["error"]["code"] == "invalid_api_key" and body["error"]["message"]
    for key in (ALICE, BOB):
        status, _, body = mesh.post("/v1/completions", COMPLETION, key)
        assert status == 200 and body["usage"]["completion_tokens"] == 4, body
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    assert mesh.post("/v1/chat/completions", chat, None)[0] == 401
    assert mesh.post("/v1/chat/completions", chat, BOB)[0] == 200
    assert mesh.get("/health") == 200 and mesh.get("/metrics") == 200  # open by default
    assert mesh.get("/v1/models") == 401
    assert "refused requests without a valid API key" in mesh.router.log_tail(20_000)
    assert ALICE not in mesh.router.log_tail(100_000)


def grpc_generate(mesh: Mesh, metadata: list[tuple[str, str]], **fields: Any) -> grpc.StatusCode:
    sampling = pb.SamplingOptions(max_tokens=3, temperature=0)
    request = pb.GenerateRequest(prompt="Hello", sampling=sampling, **fields)
    with grpc.insecure_channel(f"127.0.0.1:{mesh.grpc_port}") as channel:
        try:
            out = list(rpc.InferenceStub(channel).Generate(request, metadata=metadata, timeout=60))
        except grpc.RpcError as e:
            return e.code()
    assert sum(len(r.token_ids) for r in out) == 3
    return grpc.StatusCode.OK


def test_grpc_needs_a_key_and_health_stays_open(mesh: Mesh) -> None:
    unauthenticated = grpc.StatusCode.UNAUTHENTICATED
    assert grpc_generate(mesh, []) == unauthenticated
    assert grpc_generate(mesh, [("authorization", "Bearer sk-wrong")]) == unauthenticated
    assert grpc_generate(mesh, [("authorization", f"Bearer {ALICE}")]) == grpc.StatusCode.OK
    assert grpc_generate(mesh, [("authorization", BOB)]) == grpc.StatusCode.OK  # bare key
    with grpc.insecure_channel(f"127.0.0.1:{mesh.grpc_port}") as channel:
        stub = rpc.InferenceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ListModels(pb.ListModelsRequest(), timeout=10)
        assert info.value.code() == unauthenticated
        models = stub.ListModels(
            pb.ListModelsRequest(), metadata=[("authorization", f"Bearer {ALICE}")], timeout=10
        )
        assert models.models[0].max_model_len > 0
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def cached_tokens(mesh: Mesh, key: str, prompt: str) -> int:
    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0}
    status, _, reply = mesh.post("/v1/completions", body, key)
    assert status == 200, reply
    return reply["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_tenants_never_share_cached_blocks(mesh: Mesh) -> None:
    """The cache oracle: B must not learn from cached_tokens that A sent a prompt."""
    prompt = "Patient 4711 diagnosis: " + " ".join(f"finding {i} is stable." for i in range(20))
    assert cached_tokens(mesh, ALICE, prompt) == 0
    assert cached_tokens(mesh, ALICE, prompt) > 0  # A's own repeat hits A's cache
    assert cached_tokens(mesh, BOB, prompt) == 0  # B learns nothing about A's prompt
    assert cached_tokens(mesh, BOB, prompt) > 0  # B has a cache of its own
    narrowed = {"prompt": prompt, "max_tokens": 1, "cache_salt": "x"}
    status, _, reply = mesh.post("/v1/completions", narrowed, ALICE)
    assert status == 200 and reply["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_a_tenant_cannot_abort_another_ones_request_nor_exceed_its_limit(mesh: Mesh) -> None:
    """Alice's long stream: Bob's Abort doesn't find it, a second request of Alice's gets 429
    (--max-inflight-per-key 1) while Bob is served; Alice's own Abort ends it."""
    sampling = pb.SamplingOptions(max_tokens=1500, ignore_eos=True, temperature=0)
    request = pb.GenerateRequest(prompt="Count:", sampling=sampling, request_id="alice-long")
    alice_md = [("authorization", f"Bearer {ALICE}")]
    bob_md = [("authorization", f"Bearer {BOB}")]
    with grpc.insecure_channel(f"127.0.0.1:{mesh.grpc_port}") as channel:
        stub = rpc.InferenceStub(channel)
        stream = stub.Generate(request, metadata=alice_md, timeout=120)
        first = next(stream)  # running now
        assert first.request_id == "alice-long"
        abort = pb.AbortRequest(request_id="alice-long")
        assert not stub.Abort(abort, metadata=bob_md, timeout=10).found
        # Bob may pick the same request id: it is his own request, neither refused as a
        # duplicate (which would tell him Alice's id) nor mixed up with hers on the worker.
        same_id = pb.GenerateRequest(
            prompt="Hello", request_id="alice-long", sampling=pb.SamplingOptions(max_tokens=2)
        )
        bobs = list(stub.Generate(same_id, metadata=bob_md, timeout=60))
        assert bobs[-1].finish_reason == pb.FINISH_REASON_LENGTH, bobs
        status, _, body = mesh.post("/v1/completions", COMPLETION, ALICE)
        assert status == 429 and body["error"]["type"] == "rate_limit_error", body
        assert mesh.post("/v1/completions", COMPLETION, BOB)[0] == 200
        with pytest.raises(grpc.RpcError) as info:
            stub.Abort(abort, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.Abort(abort, metadata=alice_md, timeout=10).found
        rest = list(stream)
        assert rest and rest[-1].finish_reason == pb.FINISH_REASON_ABORT
        produced = sum(len(r.token_ids) for r in [first, *rest])
        assert produced < 1500
    assert mesh.post("/v1/completions", COMPLETION, ALICE)[0] == 200  # slot released
