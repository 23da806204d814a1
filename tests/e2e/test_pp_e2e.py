"""Pipeline parallelism through the whole mesh, on the real SmolLM2.

A disaggregated mesh started as `splitserve up --pipeline-stages 2 --micro-batches 4` starts it:
the prefill and the decode worker each run layers 0-14 and start a stage process for layers
15-29. Concurrent requests, half of them prefilled remotely (so KV is gathered from both
stages of the prefill worker and scattered over both stages of the decode worker), must give
the in-process engine's greedy tokens. Then the decode worker's stage is killed: the next
request fails with UNAVAILABLE, promptly (with another replica the router would retry there).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mesh_fixtures import (
    RPC_TIMEOUT_S,
    RunningMesh,
    assert_idle,
    greedy,
    prompt_ids,
    start_mesh,
    stream_ids,
)
from procs import child_pids

from splitserve.engine.engine import LLMEngine
from splitserve.engine.tokenizer import Tokenizer
from splitserve.v1 import pb

pytestmark = pytest.mark.slow

MAX_TOKENS = 16
PROMPTS = [
    "The three primary colours are",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "Water boils at",
]
PP_FLAGS = ("--pipeline-stages", "2", "--micro-batches", "4")
FAIL_WITHIN_S = 30.0


@pytest.fixture(scope="module")
def pp_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    mesh = start_mesh(tmp_path_factory.mktemp("pp-mesh"), *PP_FLAGS)
    try:
        yield mesh
    finally:
        mesh.stop()


def generate(mesh: RunningMesh, prompt: str, disaggregate: bool) -> list[int]:
    req = pb.GenerateRequest(
        prompt=prompt,
        sampling=pb.SamplingOptions(max_tokens=MAX_TOKENS, temperature=0),
        disaggregate=disaggregate,
    )
    ids, _, _, _ = stream_ids(mesh.inference().Generate(req, timeout=RPC_TIMEOUT_S))
    return ids


def test_pp_mesh_gives_the_engine_tokens(
    pp_mesh: RunningMesh, reference_engine: LLMEngine, tokenizer: Tokenizer
):
    expected = greedy(reference_engine, [prompt_ids(tokenizer, p) for p in PROMPTS], MAX_TOKENS)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(
            pool.map(lambda i: generate(pp_mesh, PROMPTS[i], i % 2 == 0), range(len(PROMPTS)))
        )
    for i, ids in enumerate(got):
        assert ids == expected[i], f"prompt {i} ({PROMPTS[i]!r})"
    for w in pp_mesh.workers:
        assert len(child_pids(pp_mesh.mesh.children[w].proc.pid)) == 1, w
    # The disaggregated half really moved KV between the two pipelines (no local fallback).
    received = pp_mesh.worker_metric("decode-0", "kv_transfer_bytes_total", direction="received")
    assert received > 0
    assert_idle(pp_mesh)


def test_a_dead_stage_fails_requests_with_unavailable(pp_mesh: RunningMesh):
    """Runs last: it leaves the decode worker without its stage."""
    worker = pp_mesh.mesh.children["decode-0"].proc.pid
    (stage,) = child_pids(worker)
    os.kill(stage, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        generate(pp_mesh, PROMPTS[0], disaggregate=False)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    assert "stage" in err.value.details()
    assert time.monotonic() - start < FAIL_WITHIN_S
    assert pp_mesh.mesh.children["decode-0"].proc.poll() is None  # the worker itself lives on
    # ... but stops reporting SERVING, so a router's health checks take it out of rotation.
    health = health_pb2_grpc.HealthStub(pp_mesh.channel("decode-0"))
    deadline = time.monotonic() + FAIL_WITHIN_S
    status = None
    while time.monotonic() < deadline:
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        if status == health_pb2.HealthCheckResponse.NOT_SERVING:
            break
        time.sleep(0.1)
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    # Logged before the flip, though its line can reach the file a moment after.
    assert "reporting NOT_SERVING" in pp_mesh.wait_for_log("decode-0", "reporting NOT_SERVING")
