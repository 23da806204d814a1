"""The kvstore as a real OS process: health, the RPC contract through the generated stubs, bad
input rejected without harm, a backend outage as UNAVAILABLE, SIGTERM as a clean exit."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from kvstore_testing import KVStoreProcess, make_keys, payload, throwaway_redis

from splitserve.v1 import pb, rpc

SERVICE = "splitserve.v1.KVStore"
MAX_KEYS = 64
MAX_PAYLOAD = 64 * 1024


def _start(tmp_path: Path, *args: str) -> KVStoreProcess:
    server = KVStoreProcess(tmp_path / "kvstore.log", "--log-level", "INFO", *args)
    server.wait_serving()
    return server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KVStoreProcess]:
    tmp = tmp_path_factory.mktemp("kvstore")
    limits = ("--max-keys", str(MAX_KEYS), "--max-payload-bytes", str(MAX_PAYLOAD))
    proc = _start(tmp, "--backend", "memory", "--max-bytes", "16MiB", *limits)
    yield proc
    proc.stop()


def _put(stub: rpc.KVStoreStub, blocks: list[pb.BlockPayload]) -> int:
    return stub.Put(iter(blocks), timeout=5).num_stored


def test_health_is_serving_for_the_server_and_the_service(server: KVStoreProcess) -> None:
    assert server.health_status("") == health_pb2.HealthCheckResponse.SERVING
    assert server.health_status(SERVICE) == health_pb2.HealthCheckResponse.SERVING


def test_put_match_get_stats_roundtrip(server: KVStoreProcess) -> None:
    a, b, c, x = make_keys(4, "rt")
    before = server.stub.Stats(pb.StatsRequest(), timeout=5)
    assert _put(server.stub, [pb.BlockPayload(key=k, payload=payload(k)) for k in (a, b, c)]) == 3

    match = server.stub.Match
    assert match(pb.MatchRequest(keys=[a, b, c, x]), timeout=5).num_matched == 3
    assert match(pb.MatchRequest(keys=[x, a]), timeout=5).num_matched == 0

    got = list(server.stub.Get(pb.GetRequest(keys=[c, x, a]), timeout=5))
    assert [(g.key, g.payload, g.missing) for g in got] == [
        (c, payload(c), False),
        (x, b"", True),
        (a, payload(a), False),
    ]
    after = server.stub.Stats(pb.StatsRequest(), timeout=5)
    assert after.backend == "memory"
    assert (after.puts - before.puts, after.hits - before.hits) == (3, 2)
    assert (after.misses - before.misses, after.num_blocks - before.num_blocks) == (1, 3)


def _corrupt(key: bytes) -> bytes:
    bad = bytearray(payload(key))
    bad[-1] ^= 0xFF
    return bytes(bad)


def _bad_calls(stub: rpc.KVStoreStub) -> dict[str, object]:
    k, other = make_keys(2, "bad")
    too_many = make_keys(MAX_KEYS + 1, "many")
    return {
        "match: too many keys": lambda: stub.Match(pb.MatchRequest(keys=too_many), timeout=5),
        "match: empty key": lambda: stub.Match(pb.MatchRequest(keys=[k, b""]), timeout=5),
        "get: empty key": lambda: list(stub.Get(pb.GetRequest(keys=[b""]), timeout=5)),
        "get: too many keys": lambda: list(stub.Get(pb.GetRequest(keys=too_many), timeout=5)),
        "put: empty key": lambda: _put(stub, [pb.BlockPayload(key=b"", payload=payload(k))]),
        "put: payload of another key": lambda: _put(
            stub, [pb.BlockPayload(key=k, payload=payload(other))]
        ),
        "put: bad checksum": lambda: _put(stub, [pb.BlockPayload(key=k, payload=_corrupt(k))]),
        "put: not a payload": lambda: _put(stub, [pb.BlockPayload(key=k, payload=b"pickle")]),
        "put: payload too big": lambda: _put(
            stub, [pb.BlockPayload(key=k, payload=payload(k, MAX_PAYLOAD))]
        ),
    }


def test_bad_input_is_invalid_argument_and_the_server_keeps_serving(
    server: KVStoreProcess,
) -> None:
    for name, call in _bad_calls(server.stub).items():
        with pytest.raises(grpc.RpcError) as err:
            call()  # type: ignore[operator]
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
    (key,) = make_keys(1, "after")
    assert _put(server.stub, [pb.BlockPayload(key=key, payload=payload(key))]) == 1
    assert server.stub.Match(pb.MatchRequest(keys=[key]), timeout=5).num_matched == 1
    assert server.health_status() == health_pb2.HealthCheckResponse.SERVING


def test_sigterm_exits_zero_within_seconds(tmp_path: Path) -> None:
    proc = _start(tmp_path, "--backend", "memory")
    (key,) = make_keys(1, "term")
    assert _put(proc.stub, [pb.BlockPayload(key=key, payload=payload(key))]) == 1
    start = time.monotonic()
    assert proc.stop() == 0
    assert time.monotonic() - start < 5
    assert "kvstore stopped" in proc.output()


def test_redis_outage_is_unavailable_and_the_server_keeps_serving(tmp_path: Path) -> None:
    with throwaway_redis() as url:
        proc = _start(tmp_path, "--backend", "redis", "--redis-url", url)
        try:
            keys = make_keys(2, "outage")
            blocks = [pb.BlockPayload(key=k, payload=payload(k)) for k in keys]
            assert _put(proc.stub, blocks) == 2
            assert proc.stub.Match(pb.MatchRequest(keys=keys), timeout=5).num_matched == 2
            assert proc.stub.Stats(pb.StatsRequest(), timeout=5).backend == "redis"
        except BaseException:
            proc.stop()
            raise
    # redis-server is gone now
    for call in (
        lambda: proc.stub.Match(pb.MatchRequest(keys=keys), timeout=5),
        lambda: list(proc.stub.Get(pb.GetRequest(keys=keys), timeout=5)),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "redis" in (err.value.details() or "")
    assert proc.health_status() == health_pb2.HealthCheckResponse.SERVING
    assert proc.stop() == 0
    assert proc.output().count("backend unavailable") == 1  # logged once, not per RPC


def test_kvstore_never_imports_torch() -> None:
    code = (
        "import sys, splitserve.kvstore.__main__, splitserve.workers.kvstore_client\n"
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
