"""Data parallelism through the real mesh: replicas behind one router, joining and leaving.

One mesh for the module, as `splitserve up --colocated --decode 2` starts it (each worker also
registers itself with `--router`). In order, on that mesh:

1. DP=2: a handful of greedy prompts at once spread over both replicas, and every answer is
   the in-process engine's (one replica) token for token.
2. A third worker started by hand with `--router` joins the pool by itself and gets traffic.
3. SIGKILL one listed replica: requests sent right after still all succeed (the router retries
   the ones that hit the dead replica before a token elsewhere); the dead one stays listed.
4. SIGKILL the registered one: the router drops it after a few failed health checks.
5. DP=1 (one replica left): the prompts of step 1 again, token-identical to the DP=2 answers.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from mesh_fixtures import (
    ENGINE_FLAGS,
    RPC_TIMEOUT_S,
    RunningMesh,
    chat_ids,
    greedy,
    metric_samples,
    metric_value,
    start_mesh,
    stream_ids,
)
from ports import free_ports

from splitserve.engine.engine import LLMEngine
from splitserve.engine.tokenizer import Tokenizer
from splitserve.v1 import pb

pytestmark = pytest.mark.slow

MAX_TOKENS = 32
TOPICS = ("rivers", "bread", "owls", "glass", "trains", "salt")
EXTRA_TOPICS = ("maps", "bees", "clocks")  # new prompts for the third replica's turn


def messages(topic: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Tell me one fact about {topic}."}]


@pytest.fixture(scope="module")
def dp_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    mesh = start_mesh(tmp_path_factory.mktemp("dp-mesh"), "--colocated", "--decode", "2")
    try:
        yield mesh
    finally:
        mesh.stop()


@pytest.fixture(scope="module")
def prompts(tokenizer: Tokenizer) -> dict[str, list[int]]:
    return {t: chat_ids(tokenizer, messages(t)) for t in (*TOPICS, *EXTRA_TOPICS)}


@pytest.fixture(scope="module")
def expected(reference_engine: LLMEngine, prompts: dict[str, list[int]]) -> dict[str, list[int]]:
    """One replica's greedy answers: the in-process engine on the same checkpoint."""
    outs = greedy(reference_engine, list(prompts.values()), MAX_TOKENS)
    return dict(zip(prompts, outs, strict=True))


@pytest.fixture(scope="module")
def answers() -> dict[str, list[int]]:
    """What the mesh answered at DP=2, for the DP=1 comparison at the end."""
    return {}


class ExtraWorker:
    """A colocated worker started by hand, told only where the router's internal port is (and
    given a worker certificate of its own: the Registry takes no other)."""

    def __init__(self, mesh: RunningMesh, log_dir: Path) -> None:
        self.port, self.metrics_port = free_ports(2)
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = log_dir / "colocated-extra.log"
        self._log = self.log_path.open("wb")
        argv = [
            sys.executable, "-m", "splitserve.decode", "--role", "colocated",
            "--port", str(self.port), "--worker-id", "colocated-extra",
            "--metrics-port", str(self.metrics_port), "--router", mesh.internal_address(),
            *mesh.tls_args("colocated-extra"), *ENGINE_FLAGS, "--log-level", "info",
        ]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT)

    def requests(self) -> float:
        from mesh_fixtures import scrape

        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        return scrape(url, "splitserve_worker_" + STARTED)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def extra(dp_mesh: RunningMesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExtraWorker]:
    worker = ExtraWorker(dp_mesh, tmp_path_factory.mktemp("dp-extra"))
    try:
        yield worker
    finally:
        worker.kill()


# ---- helpers ------------------------------------------------------------------------------------
def generate_all(mesh: RunningMesh, prompts: dict[str, list[int]], topics) -> dict[str, list[int]]:
    """Every topic's prompt at once (its own Generate stream each); the tokens by topic."""
    stub = mesh.inference()

    def one(topic: str) -> list[int]:
        req = pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=prompts[topic]),
            sampling=pb.SamplingOptions(max_tokens=MAX_TOKENS, temperature=0),
        )
        ids, _, _, finish = stream_ids(stub.Generate(req, timeout=RPC_TIMEOUT_S))
        assert finish in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP), topic
        return ids

    with ThreadPoolExecutor(len(topics)) as pool:
        return dict(zip(topics, pool.map(one, topics), strict=True))


# Requests a worker has produced a first token for: observed before that token is sent, so it
# is up to date once the client has its answers (requests_total is counted after the stream).
STARTED = "time_to_first_token_seconds_count"


def served(mesh: RunningMesh, worker: str) -> float:
    return mesh.worker_metric(worker, STARTED)


def router_workers(mesh: RunningMesh) -> dict[str, float]:
    """The router's pool as its metrics show it: address -> 1 healthy / 0 not."""
    samples = metric_samples(mesh.router_metrics(), "splitserve_router_worker_healthy")
    return {labels["worker"]: value for labels, value in samples}


def wait_until(predicate, what: str, mesh: RunningMesh, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}\n{mesh.tails()}")
        time.sleep(0.2)


def sigkill(mesh: RunningMesh, name: str) -> None:
    child = mesh.mesh.children[name]
    child.signal_group(signal.SIGKILL)
    child.proc.wait()


# ---- the story, in order ------------------------------------------------------------------------
def test_dp2_spreads_requests_and_matches_one_replica(dp_mesh, prompts, expected, answers):
    workers = dp_mesh.workers_of("colocated")
    assert workers == ["colocated-0", "colocated-1"]
    before = {w: served(dp_mesh, w) for w in workers}
    got = generate_all(dp_mesh, prompts, TOPICS)
    for topic in TOPICS:
        assert got[topic] == expected[topic], topic
    answers.update(got)
    share = {w: served(dp_mesh, w) - before[w] for w in workers}
    assert sum(share.values()) == len(TOPICS)
    assert all(n >= 1 for n in share.values()), f"one replica did all the work: {share}"
    # Both workers also register themselves (idempotently: the router lists them anyway). A
    # worker up before the router retries with backoff, so its registration may still be due.
    for w in workers:
        wait_until(
            lambda w=w: "registered with router" in dp_mesh.log(w), f"{w} registers", dp_mesh, 30
        )
    assert metric_value(
        dp_mesh.router_metrics(), "splitserve_router_worker_pool_changes_total", event="added"
    ) == 0  # fmt: skip


def test_a_worker_started_with_router_joins_and_gets_traffic(dp_mesh, extra, prompts, expected):
    wait_until(
        lambda: router_workers(dp_mesh).get(extra.address) == 1.0,
        f"the router lists {extra.address} as healthy",
        dp_mesh,
    )
    assert extra.proc.poll() is None, extra.log()
    got = generate_all(dp_mesh, prompts, EXTRA_TOPICS)
    for topic in EXTRA_TOPICS:
        assert got[topic] == expected[topic], topic
    # Three fresh prompts at once over three idle replicas: the least loaded wins each time.
    assert extra.requests() >= 1, "the registered worker got no request"
    text = dp_mesh.router_metrics()
    assert metric_value(text, "splitserve_router_worker_pool_changes_total", event="added") == 1


def test_killing_a_replica_keeps_the_mesh_answering(dp_mesh, extra, prompts, expected):
    sigkill(dp_mesh, "colocated-0")
    # Sent at once: the router still believes colocated-0 healthy, so some of these go there
    # first, fail UNAVAILABLE before any token, and are retried on a live replica.
    got = generate_all(dp_mesh, prompts, TOPICS)
    for topic in TOPICS:
        assert got[topic] == expected[topic], topic
    dead = dp_mesh.address("colocated-0")
    wait_until(
        lambda: router_workers(dp_mesh).get(dead) == 0.0, "colocated-0 is unhealthy", dp_mesh
    )
    time.sleep(2.0)  # four more health rounds at 0.5 s: a listed worker is never dropped
    assert router_workers(dp_mesh).get(dead) == 0.0


def test_a_dead_registered_worker_is_dropped(dp_mesh, extra):
    extra.kill()
    wait_until(
        lambda: extra.address not in router_workers(dp_mesh),
        "the router drops the killed registered worker",
        dp_mesh,
        timeout_s=30.0,
    )
    text = dp_mesh.router_metrics()
    assert metric_value(text, "splitserve_router_worker_pool_changes_total", event="dropped") == 1


def test_dp1_gives_the_same_tokens_as_dp2(dp_mesh, prompts, answers):
    assert set(answers) == set(TOPICS)
    healthy = [a for a, up in router_workers(dp_mesh).items() if up]
    assert healthy == [dp_mesh.address("colocated-1")]
    before = served(dp_mesh, "colocated-1")
    got = generate_all(dp_mesh, prompts, TOPICS)
    assert got == answers
    assert served(dp_mesh, "colocated-1") - before == len(TOPICS)
    text = dp_mesh.router_metrics()
    assert metric_value(text, "splitserve_router_requests_in_flight") == 0
    for labels, value in metric_samples(text, "splitserve_router_worker_outstanding_requests"):
        assert value == 0, labels
