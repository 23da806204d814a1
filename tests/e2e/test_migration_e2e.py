"""Requests that outlive their decode worker, through the real mesh.

One mesh for the module, as `splitserve up --decode 2` starts it (router, kvstore, a prefill
worker, two decode workers), on the tiny random checkpoint (fast, and what matters here is that
the text after a failure is the text without one, not the model's quality), with the launcher's
supervision on, as `up` runs it. In order:

1. No failure: 8 greedy streams over gRPC and one seeded, sampled stream over HTTP (SSE), all at
   once; their text is the reference.
2. SIGKILL the decode worker holding the most streams once every stream has tokens: every
   stream completes with exactly the reference text and tokens; the router counts the
   migrations; the killed worker is restarted, rejoins, and the mesh goes back to idle (no
   block, lease or load counter left anywhere) and serves.
3. SIGSTOP it instead, and SIGCONT it once the streams are done: the same. Its health checks
   fail while it is stopped, which is how the router knows to move the silent streams.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from mesh_fixtures import (
    RPC_TIMEOUT_S,
    RunningMesh,
    idle_report,
    metric_samples,
    metric_value,
    start_mesh,
)

from splitserve.v1 import pb

pytestmark = pytest.mark.slow

MAX_TOKENS = 480  # long enough that every stream is mid-way when the fault comes
TOPICS = ("rivers", "bread", "owls", "glass", "trains", "salt", "maps", "bees")
SEED = 1234
MIN_TOKENS_BEFORE_FAULT = 4


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: str) -> Iterator[RunningMesh]:
    running = start_mesh(
        tmp_path_factory.mktemp("migration-mesh"), "--model", tiny_model_dir, "--decode", "2"
    )
    running.supervise()  # as `splitserve up` does: a killed worker comes back
    try:
        yield running
    finally:
        running.stop()


class Streams:
    """The module's requests, all at once; each records its tokens and text as they come."""

    def __init__(self, mesh: RunningMesh) -> None:
        self.mesh = mesh
        self.progress: dict[str, int] = {}
        self._lock = threading.Lock()

    def _seen(self, name: str, n: int) -> None:
        with self._lock:
            self.progress[name] = self.progress.get(name, 0) + n

    def started(self, minimum: int) -> bool:
        with self._lock:
            names = (*TOPICS, "seeded")
            return all(self.progress.get(n, 0) >= minimum for n in names)

    def greedy(self, topic: str) -> tuple[list[int], str, int]:
        req = pb.GenerateRequest(
            prompt=f"Here is a long story about {topic}:",
            sampling=pb.SamplingOptions(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True),
        )
        ids: list[int] = []
        text = ""
        finish = pb.FINISH_REASON_UNSPECIFIED
        for r in self.mesh.inference().Generate(req, timeout=RPC_TIMEOUT_S):
            ids += r.token_ids
            text += r.text
            finish = r.finish_reason or finish
            self._seen(topic, len(r.token_ids))
        return ids, text, finish

    def seeded(self) -> tuple[list[int], str, int]:
        """Over HTTP, streamed: the OpenAI client reading SSE chunks."""
        client = self.mesh.openai()
        stream = client.completions.create(
            model=client.models.list().data[0].id,
            prompt="Once upon a time, in a land far away,",
            max_tokens=MAX_TOKENS,
            temperature=1.0,
            seed=SEED,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        text = ""
        finish = None
        for chunk in stream:
            choice = chunk.choices[0]
            text += choice.text
            finish = choice.finish_reason or finish
            self._seen("seeded", 1)  # a chunk per token delta
        return [], text, pb.FINISH_REASON_LENGTH if finish == "length" else 0

    def run(self, fault: Callable[[], None] | None = None) -> dict[str, tuple[list[int], str, int]]:
        """Every request at once; `fault()` once each has streamed a few tokens."""
        with ThreadPoolExecutor(len(TOPICS) + 1) as pool:
            futures = {t: pool.submit(self.greedy, t) for t in TOPICS}
            futures["seeded"] = pool.submit(self.seeded)
            if fault is not None:
                deadline = time.monotonic() + 120
                while not self.started(MIN_TOKENS_BEFORE_FAULT):
                    done = [n for n, f in futures.items() if f.done()]
                    assert not done, f"finished before the fault: {done}"
                    assert time.monotonic() < deadline, f"streams stuck: {self.progress}"
                    time.sleep(0.02)
                fault()
            return {name: f.result() for name, f in futures.items()}


@pytest.fixture(scope="module")
def reference(mesh: RunningMesh) -> dict[str, tuple[list[int], str, int]]:
    results = Streams(mesh).run()
    for name, (ids, text, finish) in results.items():
        assert finish == pb.FINISH_REASON_LENGTH, name
        assert text, name
        if ids:
            assert len(ids) == MAX_TOKENS, name
    assert len({text for _, text, _ in results.values()}) == len(results)  # all different
    wait_idle(mesh)
    return results


# ---- helpers ------------------------------------------------------------------------------------
def busiest_decoder(mesh: RunningMesh) -> str:
    """The decode worker the router has the most requests on (at least one)."""
    samples = metric_samples(mesh.router_metrics(), "splitserve_router_worker_outstanding_requests")
    by_address = {labels["worker"]: value for labels, value in samples}
    name = max(mesh.workers_of("decode"), key=lambda w: by_address.get(mesh.address(w), 0))
    assert by_address.get(mesh.address(name), 0) >= 1, by_address
    return name


def migrations(mesh: RunningMesh) -> float:
    return metric_value(
        mesh.router_metrics(), "splitserve_router_migrations_total", phase="mid_stream"
    )


def router_sees_healthy(mesh: RunningMesh, name: str) -> bool:
    samples = metric_samples(mesh.router_metrics(), "splitserve_router_worker_healthy")
    return any(labels["worker"] == mesh.address(name) and v == 1.0 for labels, v in samples)


def wait_until(predicate: Callable[[], bool], what: str, mesh: RunningMesh, timeout_s=120.0):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if predicate():
                return
        except Exception:  # a worker coming back may not answer yet
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}\n{mesh.tails()}")
        time.sleep(0.25)


def wait_idle(mesh: RunningMesh, timeout_s: float = 60.0) -> None:
    """No request, KV block, lease or outstanding token left anywhere (mesh_fixtures'
    idle_report: assert_idle's leak checks; a stream moved off a worker does end cancelled
    there, which assert_idle would count as a test walking away)."""
    problems: list[str] = []

    def clean() -> bool:
        nonlocal problems
        problems = idle_report(mesh)
        return not problems

    deadline = time.monotonic() + timeout_s
    while not _quiet(clean):
        if time.monotonic() > deadline:
            raise AssertionError("the mesh did not return to idle:\n" + "\n".join(problems))
        time.sleep(0.25)


def _quiet(check: Callable[[], bool]) -> bool:
    try:
        return check()
    except Exception:
        return False


def assert_same(got: dict, reference: dict) -> None:
    for name, (ids, text, finish) in reference.items():
        assert got[name][2] == finish, name
        assert got[name][1] == text, name  # the same text: no gap, no duplicate
        assert got[name][0] == ids, name


def assert_serving(mesh: RunningMesh, reference: dict) -> None:
    """One more greedy stream, after recovery: the reference again."""
    ids, text, _ = Streams(mesh).greedy(TOPICS[0])
    assert (ids, text) == reference[TOPICS[0]][:2]


# ---- the story, in order --------------------------------------------------------------------
def test_sigkill_of_a_decoder_mid_stream_loses_no_stream(mesh, reference):
    before = migrations(mesh)
    victim: list[str] = []

    def kill() -> None:
        victim.append(busiest_decoder(mesh))
        child = mesh.mesh.children[victim[0]]
        child.signal_group(signal.SIGKILL)

    got = Streams(mesh).run(kill)
    assert_same(got, reference)
    assert migrations(mesh) - before >= 1
    text = mesh.router_metrics()
    assert metric_value(text, "splitserve_router_migrations_total", reason="unavailable") >= 1
    wait_until(lambda: router_sees_healthy(mesh, victim[0]), f"{victim[0]} rejoins", mesh)
    wait_idle(mesh)
    assert_serving(mesh, reference)
    wait_idle(mesh)


def test_sigstop_of_a_decoder_mid_stream_loses_no_stream(mesh, reference):
    before = migrations(mesh)
    victim: list[str] = []

    def stop() -> None:
        victim.append(busiest_decoder(mesh))
        mesh.mesh.children[victim[0]].signal_group(signal.SIGSTOP)

    try:
        got = Streams(mesh).run(stop)  # all done while the victim is still stopped
    finally:
        for name in victim:
            mesh.mesh.children[name].signal_group(signal.SIGCONT)
    assert_same(got, reference)
    assert migrations(mesh) - before >= 1
    text = mesh.router_metrics()
    assert metric_value(text, "splitserve_router_migrations_total", reason="health_check") >= 1
    wait_until(lambda: router_sees_healthy(mesh, victim[0]), f"{victim[0]} is back", mesh)
    wait_idle(mesh)  # the stopped worker freed the moved streams' blocks once it resumed
    assert_serving(mesh, reference)
    wait_idle(mesh)
    # Nothing was left half-done in the router's log either.
    assert "Traceback" not in mesh.log("router")


def test_usage_counts_every_token_after_a_migration(mesh, reference):
    """A non-streamed HTTP request moved mid-generation still reports all its tokens."""
    victim: list[str] = []
    result: dict = {}

    def one() -> None:
        body = {
            "prompt": "Here is a long story about rivers:",
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
        }
        result["reply"] = mesh.http_post("/v1/completions", json.dumps(body).encode(), 300)

    def relayed() -> float:
        return metric_value(mesh.router_metrics(), "splitserve_router_generation_tokens_total")

    before, moved = relayed(), migrations(mesh)
    thread = threading.Thread(target=one)
    thread.start()
    wait_until(lambda: relayed() - before >= MIN_TOKENS_BEFORE_FAULT, "tokens flow", mesh)
    victim.append(busiest_decoder(mesh))
    mesh.mesh.children[victim[0]].signal_group(signal.SIGKILL)
    thread.join(300)
    status, reply = result["reply"]
    assert status == 200, reply
    assert reply["choices"][0]["text"] == reference["rivers"][1]
    assert reply["usage"]["completion_tokens"] == MAX_TOKENS
    assert migrations(mesh) - moved == 1
    wait_until(lambda: router_sees_healthy(mesh, victim[0]), f"{victim[0]} rejoins", mesh)
    wait_idle(mesh)
