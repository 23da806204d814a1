"""Every parallel layout, through the whole mesh, gives the single-process engine's tokens.

One disaggregated mesh per layout (router, kvstore, a prefill and a decode worker, started as
`splitserve up` starts them) on a tiny random Llama checkpoint with SmolLM2's tokenizer, so
that ten processes fit two cores: TP=2, PP=2, PP=2 with 4 micro-batches, TP=2 x PP=2 (every
worker a group of four processes), and DP=2 (two decode replicas). Requests go in concurrently
and half of them are disaggregated, so the decode batch really holds several sequences (the
micro-batches are not trivial) and KV really crosses from a sharded prefill to a sharded decode.
The real model's layouts are covered by the TP, PP and DP modules.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from mesh_fixtures import (
    RPC_TIMEOUT_S,
    RunningMesh,
    assert_idle,
    greedy,
    metric_samples,
    start_mesh,
    stream_ids,
)

from splitserve.engine.config import EngineConfig
from splitserve.engine.engine import LLMEngine
from splitserve.executors.build import create_engine
from splitserve.v1 import pb

pytestmark = pytest.mark.slow

MAX_TOKENS = 16
PROMPTS = [
    "The three primary colours are",
    "Once upon a time, in a land far away,",
    "def fibonacci(n):",
    "Paris is the capital of",
    "A list of prime numbers: 2, 3, 5, 7,",
    "Water boils at",
]
LAYOUTS = {
    "tp2": ("--tensor-parallel-size", "2"),
    "pp2": ("--pipeline-stages", "2"),
    "pp2-m4": ("--pipeline-stages", "2", "--micro-batches", "4"),
    "tp2-pp2": ("--tensor-parallel-size", "2", "--pipeline-stages", "2", "--micro-batches", "2"),
    "dp2": ("--decode", "2"),
}


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir: str) -> LLMEngine:
    return create_engine(EngineConfig(model=tiny_model_dir, num_kv_blocks=256))


@pytest.fixture(scope="module")
def expected(tiny_engine: LLMEngine) -> list[list[int]]:
    tok = tiny_engine.tokenizer
    return greedy(tiny_engine, [tok.encode(p) for p in PROMPTS], MAX_TOKENS)


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def layout_mesh(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: str
) -> Iterator[tuple[str, RunningMesh]]:
    name = request.param
    mesh = start_mesh(
        tmp_path_factory.mktemp(f"mesh-{name}"), "--model", tiny_model_dir, *LAYOUTS[name]
    )
    try:
        yield name, mesh
    finally:
        mesh.stop()


def wait_decode_workers_healthy(mesh: RunningMesh, count: int, timeout_s: float = 60.0) -> None:
    """Until the router has `count` decode workers healthy: on a loaded machine the second
    replica's first health check can come after the router already serves, and requests sent
    before it would all go to the first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        samples = metric_samples(mesh.router_metrics(), "splitserve_router_worker_healthy")
        if sum(v for labels, v in samples if labels.get("role") == "decode") >= count:
            return
        time.sleep(0.2)
    raise TimeoutError(f"the router never saw {count} decode workers healthy\n{mesh.tails()}")


def test_layout_matches_the_single_process_engine(layout_mesh, expected, tiny_engine):
    name, mesh = layout_mesh
    if name == "dp2":
        wait_decode_workers_healthy(mesh, 2)
    stub = mesh.inference()

    def one(i: int) -> list[int]:
        req = pb.GenerateRequest(
            prompt=PROMPTS[i],
            sampling=pb.SamplingOptions(max_tokens=MAX_TOKENS, temperature=0),
            disaggregate=i % 2 == 0,
        )
        ids, _, _, _ = stream_ids(stub.Generate(req, timeout=RPC_TIMEOUT_S))
        return ids

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(one, range(len(PROMPTS))))
    for i, ids in enumerate(got):
        assert ids == expected[i], f"{name}: prompt {i} ({PROMPTS[i]!r})"
    if name == "dp2":
        served = [mesh.worker_metric(w, "requests_total") for w in mesh.workers_of("decode")]
        assert all(n > 0 for n in served), f"a decode replica got no request: {served}"
    assert_idle(mesh)
