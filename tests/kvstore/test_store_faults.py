"""Store faults: what a dead, stopped, restarted or lying kvstore (or Redis) costs a worker.

- The client's circuit breaker, on its own (with a clock the test moves).
- Redis SIGKILLed and restarted on its port, and SIGSTOPped, under a running kvstore process:
  UNAVAILABLE meanwhile (never a hang past the caller's deadline), and service again after,
  without restarting the kvstore.
- A kvstore process SIGSTOPped, then SIGKILLed, under a worker (tiny model, in this process):
  every answer is still the engine's, the breaker keeps requests from waiting on it, and the
  worker uses the store again once it answers.
- A rogue kvstore (a real gRPC server) returning each kind of bad block: every one is refused
  and counted by reason, the answer is unchanged, nothing enters the local prefix cache.
- The kvstore with --mesh-secret-file refuses unsigned and forged Puts (INVALID_ARGUMENT).
- The attack of issue 14, reproduced with SmolLM2: blocks a worker computed for one prompt,
  re-keyed under another prompt's hash chain and written straight into the store (memory and
  Redis) change that prompt's answer on an unsigned mesh, and are refused on a signed one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import redis
import torch
from grpc_health.v1 import health_pb2
from kvstore_testing import (
    SHARED_REDIS_URL,
    KVStoreProcess,
    RedisServer,
    delete_prefix,
    make_keys,
    payload,
    unique_prefix,
)
from ports import free_port
from workers_util import aio_channel, prompt, running, serve_decode, tiny_engine

from splitserve.engine.config import EngineConfig
from splitserve.engine.engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.executors.build import create_engine
from splitserve.kvstore.backends import KVBackend, MemoryBackend, RedisBackend
from splitserve.kvstore.service import KVStoreServicer
from splitserve.model.loader import Checkpoint
from splitserve.v1 import pb, rpc
from splitserve.wire import kv_payload
from splitserve.wire.kv_codec import encode_block
from splitserve.workers.kvstore_client import CircuitBreaker, KVStoreClient

SECRET = b"mesh-secret-for-the-store-fault-tests"
ATTACKER_SECRET = b"a-secret-the-attacker-made-up-itself"
N = 6
GREEDY = pb.SamplingOptions(max_tokens=N, temperature=0, ignore_eos=True)


# ---- the circuit breaker ----------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_the_threshold_probes_once_and_backs_off_exponentially() -> None:
    clock, changes = Clock(), []
    b = CircuitBreaker(2, 1.0, 4.0, on_change=lambda s, o: changes.append((s, o)), clock=clock)
    assert b.allow()
    b.record_failure()
    assert b.state == b.CLOSED and b.allow()  # one failure is below the threshold
    b.record_failure()
    assert b.state == b.OPEN and not b.allow() and not b.ready
    clock.now += 0.99
    assert not b.allow()
    for expected_backoff in (2.0, 4.0, 4.0):  # doubles, up to the cap
        clock.now += b.backoff_s
        assert b.ready and b.allow()  # the probe
        assert b.state == b.HALF_OPEN
        assert not b.allow() and not b.ready  # one probe at a time
        b.record_failure()
        assert b.state == b.OPEN and b.backoff_s == expected_backoff
    clock.now += b.backoff_s
    assert b.allow()
    b.record_success()
    assert b.state == b.CLOSED and b.backoff_s == 1.0 and b.allow()
    assert b.opens == 4
    assert changes[:3] == [(b.OPEN, True), (b.HALF_OPEN, False), (b.OPEN, True)]
    assert changes[-1] == (b.CLOSED, False)


def test_breaker_ignores_late_failures_while_open_and_frees_an_abandoned_probe() -> None:
    clock = Clock()
    b = CircuitBreaker(1, 1.0, 8.0, clock=clock)
    b.record_failure()
    b.record_failure()  # calls that started before it opened: no longer backoff
    assert b.state == b.OPEN and b.backoff_s == 1.0 and b.opens == 1
    clock.now += 1.0
    assert b.allow() and not b.allow()
    b.release()  # the probe was cancelled with its request: the next call probes instead
    assert b.allow()


@pytest.mark.asyncio
async def test_client_reports_outcomes_and_breaker_state_to_metrics() -> None:
    from splitserve.workers.metrics import WorkerMetrics

    metrics = WorkerMetrics("prefill", "p-test")
    dead = f"127.0.0.1:{free_port()}"
    client = KVStoreClient(dead, timeout_s=0.5, backoff_s=60.0, metrics=metrics)
    keys = make_keys(2, "metrics")
    try:
        assert await client.match(keys) == 0
        assert await client.get(keys) == [None, None]
        assert await client.put([(keys[0], payload(keys[0]))]) == 0
    finally:
        await client.close()
    assert metrics.value("kvstore_requests_total", op="match", outcome="error") == 1
    assert metrics.value("kvstore_requests_total", op="get", outcome="skipped") == 1
    assert metrics.value("kvstore_requests_total", op="put", outcome="skipped") == 1
    assert metrics.value("kvstore_circuit_state") == CircuitBreaker.OPEN
    assert metrics.value("kvstore_circuit_opens_total") == 1


# ---- Redis dies, stalls and comes back under a running kvstore ---------------------------------
def _blocks(keys: list[bytes]) -> list[pb.BlockPayload]:
    return [pb.BlockPayload(key=k, payload=payload(k)) for k in keys]


def _status_of(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def test_redis_killed_and_restarted_on_its_port(tmp_path: Path) -> None:
    with RedisServer() as server:
        server.start()
        kv = KVStoreProcess(
            tmp_path / "kv.log", "--backend", "redis", "--redis-url", server.url
        ).wait_serving()
        try:
            keys = make_keys(4, "restart")
            assert kv.stub.Put(iter(_blocks(keys[:2])), timeout=10).num_stored == 2
            server.kill()
            # A generous deadline: a kvstore that hung on the dead Redis would show as
            # DEADLINE_EXCEEDED; it must answer UNAVAILABLE by itself, from its own timeouts.
            calls = {
                "match": lambda: kv.stub.Match(pb.MatchRequest(keys=keys), timeout=20),
                "get": lambda: list(kv.stub.Get(pb.GetRequest(keys=keys), timeout=20)),
                "put": lambda: kv.stub.Put(iter(_blocks(keys[2:])), timeout=20),
            }
            for name, call in calls.items():
                assert _status_of(call) == grpc.StatusCode.UNAVAILABLE, name
            assert kv.health_status() == health_pb2.HealthCheckResponse.SERVING

            server.start()  # same port, empty (no persistence)
            assert kv.stub.Put(iter(_blocks(keys[2:])), timeout=10).num_stored == 2
            assert kv.stub.Match(pb.MatchRequest(keys=keys[2:]), timeout=10).num_matched == 2
            assert kv.stub.Match(pb.MatchRequest(keys=keys), timeout=10).num_matched == 0
            got = list(kv.stub.Get(pb.GetRequest(keys=keys[2:]), timeout=10))
            assert [b.payload for b in got] == [payload(k) for k in keys[2:]]
            assert kv.proc.poll() is None  # the same kvstore process throughout
        finally:
            assert kv.stop() == 0
    assert "backend is answering again" in kv.output()


def test_redis_stopped_is_unavailable_within_the_socket_timeout(tmp_path: Path) -> None:
    with RedisServer() as server:
        server.start()
        kv = KVStoreProcess(
            tmp_path / "kv.log", "--backend", "redis", "--redis-url", server.url
        ).wait_serving()
        try:
            keys = make_keys(2, "stopped")
            assert kv.stub.Put(iter(_blocks(keys)), timeout=10).num_stored == 2
            server.pause()  # SIGSTOP: connections stay open, nothing answers
            code = _status_of(lambda: kv.stub.Match(pb.MatchRequest(keys=keys), timeout=30))
            assert code == grpc.StatusCode.UNAVAILABLE
            server.resume()
            assert kv.stub.Match(pb.MatchRequest(keys=keys), timeout=10).num_matched == 2
        finally:
            assert kv.stop() == 0


# ---- a kvstore that stops answering, then dies, under a worker --------------------------------
def reference(p: list[int]) -> list[int]:
    params = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)
    return tiny_engine().generate([p], params)[0].new_token_ids


async def decode(address: str, p: list[int], salt: str = "") -> tuple[list[int], pb.Usage]:
    async with aio_channel(address) as channel:
        req = pb.DecodeRequest(prompt_token_ids=p, sampling=GREEDY, cache_salt=salt)
        responses = [r async for r in rpc.DecodeStub(channel).Generate(req, timeout=60)]
    return [t for r in responses for t in r.token_ids], responses[-1].usage


async def wait_for(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def serve_with_store(engine, address: str, **client_kw):
    """A colocated worker on `engine` whose kvstore client reports to its metrics, signing and
    verifying with SECRET."""
    served = await serve_decode(engine)
    m = served.worker.metrics
    client = KVStoreClient(address, metrics=m, **client_kw)
    served.worker.prefix.store = client
    served.worker.prefix.secret = SECRET
    return served


@pytest.mark.asyncio
async def test_stopped_then_killed_kvstore_costs_workers_one_deadline_not_answers(
    tmp_path: Path,
) -> None:
    kv = KVStoreProcess(tmp_path / "kv.log", "--backend", "memory").wait_serving()
    p0 = prompt(26)  # 6 full blocks of 4
    later = [prompt(26, offset=i) for i in range(1, 7)]
    after = prompt(26, offset=50)
    expected = {tuple(p): reference(p) for p in [p0, *later, after]}
    client_kw = {"timeout_s": 0.5, "backoff_s": 1.0, "max_backoff_s": 2.0}
    try:
        async with (
            running(serve_with_store(tiny_engine(), kv.address, **client_kw)) as a,
            running(serve_with_store(tiny_engine(), kv.address, **client_kw)) as b,
        ):
            store_a, store_b = a.worker.prefix.store, b.worker.prefix.store
            m = b.worker.metrics
            # Healthy: A computes p0 and writes it back; B fetches it.
            assert (await decode(a.address, p0))[0] == expected[tuple(p0)]
            await wait_for(lambda: store_a.counters.puts == 6)
            ids, usage = await decode(b.address, p0)
            assert ids == expected[tuple(p0)] and usage.cached_prompt_tokens == 24
            assert m.value("kvstore_blocks_fetched_total") == 6

            # Stopped: the first request waits one deadline, the breaker opens, and the
            # rest don't call it at all. Every answer is still the engine's.
            kv.proc.send_signal(signal.SIGSTOP)
            for p in later:
                ids, usage = await decode(b.address, p)
                assert ids == expected[tuple(p)] and usage.cached_prompt_tokens == 0
            c = store_b.counters
            assert 1 <= c.errors < len(later) and c.skipped >= 1, c
            assert m.value("kvstore_circuit_opens_total") >= 1
            assert m.value("kvstore_requests_total", op="match", outcome="skipped") >= 1
            assert m.value("kvstore_circuit_state") == CircuitBreaker.OPEN

            # Back: once the backoff passes, a probe closes the circuit and B fetches again.
            kv.proc.send_signal(signal.SIGCONT)
            assert (await decode(a.address, after))[0] == expected[tuple(after)]
            await wait_for(lambda: store_a.counters.puts == 12)
            await wait_for(lambda: store_b.is_healthy)
            ids, usage = await decode(b.address, after)
            assert ids == expected[tuple(after)] and usage.cached_prompt_tokens == 24
            assert m.value("kvstore_blocks_fetched_total") == 12
            assert m.value("kvstore_circuit_state") == CircuitBreaker.CLOSED

            # Dead: answers are unchanged, and the worker keeps serving.
            kv.proc.kill()
            kv.proc.wait(timeout=10)
            errors = store_b.counters.errors
            for p in later[:3]:
                assert (await decode(b.address, p))[0] == expected[tuple(p)]
            assert store_b.counters.errors > errors
            assert m.value("kvstore_circuit_state") == CircuitBreaker.OPEN
    finally:
        kv.stop()


# ---- a kvstore that lies ------------------------------------------------------------------------
class RogueKVStore(rpc.KVStoreServicer):
    """Claims every block and serves whatever `forge(key)` makes of it."""

    def __init__(self, forge: Callable[[bytes], bytes]) -> None:
        self.forge = forge
        self.puts = 0

    async def Match(self, request, context):
        return pb.MatchResponse(num_matched=len(request.keys))

    async def Get(self, request, context):
        for key in request.keys:
            yield pb.BlockPayload(key=key, payload=self.forge(key))

    async def Put(self, request_iterator, context):
        async for _ in request_iterator:
            self.puts += 1
        return pb.PutResponse(num_stored=0)


def forgeries(block_shape: tuple[int, ...]) -> dict[str, Callable[[bytes], bytes]]:
    """For each rejection reason, a payload that fails exactly that check."""
    good = torch.randn(block_shape)

    def signed(key: bytes, t: torch.Tensor = good, secret: bytes | None = SECRET) -> bytes:
        return encode_block(key, t, secret)

    def flip_data_byte(key: bytes) -> bytes:
        p = bytearray(signed(key))
        p[-1] ^= 0xFF
        return bytes(p)

    def forged_version(key: bytes) -> bytes:
        p = bytearray(signed(key))
        p[4] = 9
        return bytes(p)

    return {
        "signature": lambda k: signed(k, secret=ATTACKER_SECRET),
        "unsigned": lambda k: signed(k, secret=None),
        "key": lambda k: signed(bytes(32 - len(k)) + k[::-1]),
        "shape": lambda k: signed(k, good[:, :, :2].contiguous()),
        "dtype": lambda k: signed(k, good.to(torch.float16)),
        "checksum": flip_data_byte,
        "truncated": lambda k: signed(k)[:-3],
        "size": lambda k: signed(k) + b"\0\0\0\0",
        "version": forged_version,
        "format": lambda k: b"SSKX" + signed(k)[4:],
        "nonfinite": lambda k: signed(k, torch.where(good > 1, float("inf"), good)),
    }


@pytest.mark.asyncio
async def test_every_kind_of_bad_block_is_refused_counted_and_never_cached(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="splitserve")
    p = prompt(26)
    expected = reference(p)
    engine = tiny_engine()
    pool = engine.runner.kv_layout
    kinds = forgeries(pool[:2] + pool[3:])
    assert set(kinds) == set(kv_payload.REASONS)
    rogue = RogueKVStore(lambda key: b"")
    server = grpc.aio.server()
    rpc.add_KVStoreServicer_to_server(rogue, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    try:
        async with running(serve_with_store(engine, address, timeout_s=5)) as w:
            m = w.worker.metrics
            for i, (reason, forge) in enumerate(kinds.items()):
                rogue.forge = forge
                ids, usage = await decode(w.address, p, salt=f"tenant-{i}")
                assert ids == expected, reason
                assert usage.cached_prompt_tokens == 0, reason  # nothing adopted
                # The chain stops at its first bad block: one rejection per request.
                assert m.value("kvstore_blocks_rejected_total", reason=reason) == 1, reason
            assert m.value("kvstore_blocks_fetched_total") == 0
            bm = w.worker.engine.engine.block_manager
            assert bm.num_free_blocks == bm.num_blocks
            # A store full of forgeries is counted in full but logged once per reason and
            # interval, not once per block.
            rogue.forge = kinds["signature"]
            for i in range(5):
                assert (await decode(w.address, p, salt=f"again-{i}"))[0] == expected
            assert m.value("kvstore_blocks_rejected_total", reason="signature") == 6
    finally:
        await server.stop(None)
    logged = [r.getMessage() for r in caplog.records if "rejected (signature)" in r.getMessage()]
    assert len(logged) == 1, logged


@pytest.mark.asyncio
async def test_a_good_chain_is_used_up_to_its_first_bad_block() -> None:
    """Blocks 0-2 sound (signed real KV), block 3 forged: 3 adopted, the rest computed."""
    p = prompt(26)
    expected = reference(p)
    ref = tiny_engine()
    ref.add_request("kv", p, SamplingParams(max_tokens=1, temperature=0), export_kv=True)
    kv = next(o for _ in range(50) for o in ref.step() if o.finished).kv.data
    engine = tiny_engine()
    keys = engine.prompt_block_hashes(p, None)
    sound = {k: encode_block(k, kv[:, :, i].contiguous(), SECRET) for i, k in enumerate(keys)}
    sound[keys[3]] = encode_block(keys[3], kv[:, :, 3].contiguous(), ATTACKER_SECRET)
    server = grpc.aio.server()
    rpc.add_KVStoreServicer_to_server(RogueKVStore(lambda key: sound[key]), server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    try:
        async with running(serve_with_store(engine, address, timeout_s=5)) as w:
            ids, usage = await decode(w.address, p)
            m = w.worker.metrics
            assert ids == expected
            assert m.value("kvstore_blocks_fetched_total") == 3
            assert usage.cached_prompt_tokens == 12
            assert m.value("kvstore_blocks_rejected_total", reason="signature") == 1
    finally:
        await server.stop(None)


# ---- the kvstore refuses forged Puts when it has the secret -----------------------------------
def test_kvstore_with_the_secret_refuses_unsigned_and_forged_puts(tmp_path: Path) -> None:
    secret_file = tmp_path / "mesh-secret"
    secret_file.write_bytes(SECRET + b"\n")
    kv = KVStoreProcess(
        tmp_path / "kv.log", "--backend", "memory", "--mesh-secret-file", str(secret_file)
    ).wait_serving()
    try:
        a, b, c = make_keys(3, "door")
        for key, p, reason in (
            (a, payload(a), "unsigned"),
            (b, payload(b, secret=ATTACKER_SECRET), "signature"),
        ):
            block = pb.BlockPayload(key=key, payload=p)
            with pytest.raises(grpc.RpcError) as err:
                kv.stub.Put(iter([block]), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert reason in (err.value.details() or ""), err.value.details()
        signed = pb.BlockPayload(key=c, payload=payload(c, secret=SECRET))
        assert kv.stub.Put(iter([signed]), timeout=10).num_stored == 1
        assert kv.stub.Match(pb.MatchRequest(keys=[a]), timeout=10).num_matched == 0
        assert kv.stub.Match(pb.MatchRequest(keys=[c]), timeout=10).num_matched == 1
    finally:
        assert kv.stop() == 0
    refused = [line for line in kv.output().splitlines() if "refused a Put" in line]
    assert len(refused) == 1  # logged, rate-limited: the second refusal came within 10 s
    assert SECRET.decode() not in kv.output()


@pytest.mark.parametrize(
    ("content", "needle"), [(None, "No such file"), (b"short\n", "at least 16")]
)
def test_a_worker_with_an_unusable_secret_file_stops_in_one_line(
    tmp_path: Path, content: bytes | None, needle: str
) -> None:
    path = tmp_path / "secret"
    if content is not None:
        path.write_bytes(content)
    proc = subprocess.run(
        [sys.executable, "-m", "splitserve.prefill", "--port", "0", "--mesh-secret-file", path],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SPLITSERVE_OTEL_EXPORTER": "none"},
    )
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if "cannot start" in line]
    assert len(errors) == 1 and needle in errors[0], proc.stderr


@pytest.mark.parametrize("secret_from", [None, "env", "file"])
def test_a_worker_warns_once_when_its_kvstore_blocks_are_unsigned(
    tiny_model_dir: str, tmp_path: Path, secret_from: str | None
) -> None:
    """A prefill process with a kvstore: one warning at start without a secret, none with one
    from the environment or a file; either way it serves."""
    from workers_util import WorkerProcess

    path = tmp_path / "secret"
    path.write_bytes(SECRET)
    args = ["--model", tiny_model_dir, "--kvstore", f"127.0.0.1:{free_port()}", "--threads", "1"]
    if secret_from == "file":
        args += ["--mesh-secret-file", str(path)]
    env_before = os.environ.pop(kv_payload.MESH_SECRET_ENV, None)  # the child inherits ours
    if secret_from == "env":
        os.environ[kv_payload.MESH_SECRET_ENV] = SECRET.decode()
    worker = WorkerProcess("prefill", args)
    try:
        worker.start(str(tmp_path))
    finally:
        os.environ.pop(kv_payload.MESH_SECRET_ENV, None)
        if env_before is not None:
            os.environ[kv_payload.MESH_SECRET_ENV] = env_before
    try:
        worker.wait_serving()
    finally:
        worker.stop()
    warnings = worker.log().count("kvstore blocks are unsigned")
    assert warnings == (1 if secret_from is None else 0), worker.log()
    assert SECRET.decode() not in worker.log()


# ---- the attack from issue 14, with SmolLM2 -----------------------------------------------------
HOME = "My home country is {}, and I have lived there for all of my life."
QUESTION = " The capital city of my home country is"


@pytest.fixture(scope="module")
def smollm2_engines(smollm2_checkpoint: Checkpoint) -> list[LLMEngine]:
    """Two engines on the real weights: the worker under test and the unsigned control."""
    cfg = EngineConfig(kv_cache_memory_bytes=64 * 1024 * 1024)
    return [create_engine(cfg, smollm2_checkpoint) for _ in range(2)]


def rekey(stored: bytes, key: bytes, how: str) -> bytes:
    """The attacker's move: a stored block of prompt A, made to look like `key`'s."""
    header = kv_payload.parse_header(stored)
    data = bytes(kv_payload.payload_data(stored, header))
    if how == "copied tag":  # swap the embedded key, keep everything else byte for byte
        assert len(key) == len(header.key)
        at = stored.index(header.key)
        return stored[:at] + key + stored[at + len(key) :]
    secret = ATTACKER_SECRET if how == "attacker's secret" else None
    return kv_payload.encode_payload(key, header.dtype, header.shape, data, secret)


@pytest.mark.slow
@pytest.mark.asyncio
@pytest.mark.parametrize("backend_kind", ["memory", "redis"])
async def test_blocks_rekeyed_from_another_prompt_are_refused(
    smollm2_engines: list[LLMEngine], smollm2_checkpoint: Checkpoint, backend_kind: str
) -> None:
    tok = smollm2_checkpoint.tokenizer
    assert tok is not None
    prompt_a = tok.encode(HOME.format("France") + QUESTION)
    prompt_b = tok.encode(HOME.format("Germany") + QUESTION)
    assert len(prompt_a) == len(prompt_b) == 25  # one full block of 16, "France" in it
    signed_engine, control_engine = smollm2_engines
    params = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)
    # What a worker with no store answers (the salts below keep these blocks out of the way).
    want_a, want_b = (
        o.new_token_ids for o in control_engine.generate([prompt_a, prompt_b], params)
    )
    assert tok.decode(want_b).startswith(" Berlin"), tok.decode(want_b)

    prefix = unique_prefix()
    backend: KVBackend
    if backend_kind == "memory":
        backend = MemoryBackend(1 << 28)
    else:
        backend = RedisBackend(SHARED_REDIS_URL, prefix)
        await backend.start()
    raw = redis.Redis.from_url(SHARED_REDIS_URL)
    server = grpc.aio.server()
    rpc.add_KVStoreServicer_to_server(KVStoreServicer(backend), server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()

    async def plant(key: bytes, value: bytes) -> None:
        """Straight into the store's memory, or into Redis with a plain client: as anyone who
        reaches Redis (or the store's process) could."""
        if backend_kind == "memory":
            assert await backend.put_many([(key, value)]) == 1
        else:
            assert raw.set(prefix + key, value)

    async def poison(worker, salt: str, how: str) -> None:
        """The worker computes A (its blocks go to the store); the attacker re-keys them
        under B's hash chain."""
        ids, _ = await decode(worker.address, prompt_a, salt)
        assert ids == want_a
        engine = worker.worker.engine.engine
        keys_a = engine.prompt_block_hashes(prompt_a, salt)
        keys_b = engine.prompt_block_hashes(prompt_b, salt)
        await wait_for_async(lambda: backend.match(keys_a), len(keys_a))
        for kb, value in zip(keys_b, await backend.get_many(keys_a), strict=True):
            assert value is not None
            await plant(kb, rekey(value, kb, how))
        assert await backend.match(keys_b) == len(keys_b)

    try:
        async with (
            running(serve_with_store(signed_engine, address, timeout_s=10)) as w,
            running(serve_decode(control_engine)) as control,
        ):
            m = w.worker.metrics
            # The unsigned control mesh: the attack works (Paris for Germany).
            control.worker.prefix.store = KVStoreClient(address, timeout_s=10)
            await poison(control, f"{backend_kind}-control", "unsigned")
            poisoned, usage = await decode(control.address, prompt_b, f"{backend_kind}-control")
            assert usage.cached_prompt_tokens == 16  # the planted block was used ...
            assert poisoned != want_b  # ... and changed the answer
            await control.worker.prefix.store.close()

            # The signed mesh: each forgery is refused and B is answered as with no store.
            for how, reason in (
                ("copied tag", "signature"),
                ("attacker's secret", "signature"),
                ("unsigned", "unsigned"),
            ):
                salt = f"{backend_kind}-tenant-{how}"  # the engines serve both backends
                await poison(w, salt, how)
                before = m.value("kvstore_blocks_rejected_total", reason=reason)
                ids, usage = await decode(w.address, prompt_b, salt)
                assert ids == want_b, (how, tok.decode(ids))
                assert usage.cached_prompt_tokens == 0
                assert m.value("kvstore_blocks_rejected_total", reason=reason) == before + 1
                # The local prefix cache holds B's own KV now, never the planted block.
                engine = w.worker.engine.engine
                keys_b = engine.prompt_block_hashes(prompt_b, salt)
                planted = (await backend.get_many(keys_b))[0]
                assert planted is not None
                planted_kv = torch.frombuffer(
                    bytearray(kv_payload.payload_data(planted, kv_payload.parse_header(planted))),
                    dtype=torch.float32,
                )
                cached = await w.worker.engine.call(lambda e, k=keys_b: cached_block(e, k))
                assert cached.numel() == planted_kv.numel()
                assert not torch.equal(cached.flatten(), planted_kv)
                ids, usage = await decode(w.address, prompt_b, salt)  # from the local cache
                assert ids == want_b and usage.cached_prompt_tokens == 16
            assert m.value("kvstore_blocks_fetched_total") == 0
    finally:
        await server.stop(None)
        await backend.close()
        raw.close()
        if backend_kind == "redis":
            delete_prefix(SHARED_REDIS_URL, prefix)


def cached_block(engine: LLMEngine, keys: list[bytes]) -> torch.Tensor:
    """The KV the local prefix cache holds for the first block of `keys`."""
    block_ids = engine.block_manager.cached_prefix_blocks(keys[:1])
    assert len(block_ids) == 1
    return engine.runner.read_blocks(block_ids, engine.block_size).data


async def wait_for_async(probe: Callable[[], object], want: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (got := await probe()) != want:  # type: ignore[misc]
        assert time.monotonic() < deadline, f"store holds {got} of {want} blocks"
        await asyncio.sleep(0.05)
