"""Tensor parallelism through the real mesh: `splitserve up --tensor-parallel-size 2`.

One prefill and one decode worker, each a group of two rank processes on the default model
(SmolLM2-135M: 3 KV heads cut 2 + 1), an in-memory kvstore and the router. Prompts sent
disaggregated (prefill -> KV in the full-head layout -> decode) and locally must give the
in-process single-process engine's greedy tokens; stopping the mesh stops every rank.
"""

from __future__ import annotations

import os
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
    start_mesh,
    stream_ids,
)
from procs import rank_pids

from splitserve.engine.engine import LLMEngine
from splitserve.engine.tokenizer import Tokenizer
from splitserve.v1 import pb

pytestmark = pytest.mark.slow

MAX_TOKENS = 24
TOPICS = ("rivers", "owls", "glass")
GREEDY = pb.SamplingOptions(max_tokens=MAX_TOKENS, temperature=0)


def messages(topic: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Tell me one fact about {topic}."}]


@pytest.fixture(scope="module")
def tp_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    mesh = start_mesh(
        tmp_path_factory.mktemp("tp-mesh"),
        *("--prefill", "1", "--decode", "1", "--tensor-parallel-size", "2"),
    )
    try:
        yield mesh
    finally:
        if any(c.proc.poll() is None for c in mesh.mesh.children.values()):
            mesh.stop()  # unless the last test already did


@pytest.fixture(scope="module")
def prompts(tokenizer: Tokenizer) -> dict[str, list[int]]:
    return {t: chat_ids(tokenizer, messages(t)) for t in TOPICS}


@pytest.fixture(scope="module")
def expected(reference_engine: LLMEngine, prompts: dict[str, list[int]]) -> dict[str, list[int]]:
    """TP=1: the in-process engine on the same checkpoint."""
    outs = greedy(reference_engine, list(prompts.values()), MAX_TOKENS)
    return dict(zip(prompts, outs, strict=True))


def test_every_worker_runs_a_group_of_two_ranks(tp_mesh: RunningMesh) -> None:
    assert sorted(tp_mesh.workers) == ["decode-0", "prefill-0"]
    for w in tp_mesh.workers:
        ranks = rank_pids(tp_mesh.mesh.children[w].proc.pid)
        assert len(ranks) == 1, (w, ranks)


def test_greedy_tokens_match_one_process_disaggregated_and_local(
    tp_mesh: RunningMesh, expected: dict[str, list[int]], tokenizer: Tokenizer
) -> None:
    stub = tp_mesh.inference()
    decode = tp_mesh.workers_of("decode")[0]
    received = tp_mesh.worker_metric(decode, "kv_transfer_bytes_total", direction="received")
    # Two go through prefill and hand their KV to decode; one is prefilled on decode itself.
    modes = dict(zip(TOPICS, (True, True, False), strict=True))

    def ask(topic: str) -> list[int]:
        req = pb.GenerateRequest(sampling=GREEDY, disaggregate=modes[topic])
        req.chat.messages.extend(pb.ChatMessage(**m) for m in messages(topic))
        ids, text, _, _ = stream_ids(stub.Generate(req, timeout=RPC_TIMEOUT_S))
        assert text == tokenizer.decode(ids)
        return ids

    with ThreadPoolExecutor(len(TOPICS)) as pool:  # at once: batched steps on the decode group
        got = dict(zip(TOPICS, pool.map(ask, TOPICS), strict=True))
    for topic in TOPICS:
        assert got[topic] == expected[topic], topic
    after = tp_mesh.worker_metric(decode, "kv_transfer_bytes_total", direction="received")
    assert after > received  # the full-head KV really crossed from the prefill group
    assert tp_mesh.worker_metric(decode, "kv_transfer_fallbacks_total") == 0
    assert_idle(tp_mesh)


def test_stopping_the_mesh_stops_every_rank(tp_mesh: RunningMesh) -> None:
    ranks = [pid for w in tp_mesh.workers for pid in rank_pids(tp_mesh.mesh.children[w].proc.pid)]
    assert len(ranks) == 2
    tp_mesh.stop()
    deadline = time.monotonic() + 30
    for pid in ranks:
        while os.path.exists(f"/proc/{pid}"):
            assert time.monotonic() < deadline, f"rank {pid} outlived the mesh"
            time.sleep(0.1)
    for w in ("prefill-0", "decode-0"):  # a clean drain, not the launcher's SIGKILL
        assert tp_mesh.mesh.children[w].proc.returncode == 0, tp_mesh.log(w)[-2000:]
        assert "Traceback" not in tp_mesh.log(w), w
