"""The kvstore against a Redis that wants a password (AUTH) or TLS (rediss://), each started here
with its own redis-server: the right credentials work end to end through the kvstore process,
wrong ones stop it at start with one line that never shows the password."""

from __future__ import annotations

from pathlib import Path

import pytest
from kvstore_testing import (
    KVStoreProcess,
    RedisServer,
    make_keys,
    make_test_pki,
    payload,
)
from ports import free_port

from splitserve.kvstore.backends import BackendError, RedisBackend, RedisTLS, redact_url
from splitserve.v1 import pb

PASSWORD = "s3cret-redis-pass"


def roundtrip(kv: KVStoreProcess) -> None:
    keys = make_keys(3, "auth")
    blocks = [pb.BlockPayload(key=k, payload=payload(k)) for k in keys]
    assert kv.stub.Put(iter(blocks), timeout=10).num_stored == 3
    assert kv.stub.Match(pb.MatchRequest(keys=keys), timeout=10).num_matched == 3
    got = list(kv.stub.Get(pb.GetRequest(keys=keys), timeout=10))
    assert [b.payload for b in got] == [payload(k) for k in keys]


def refused_at_start(kv: KVStoreProcess) -> str:
    """The kvstore's exit status is 1 and its error is one line; returns that line."""
    assert kv.wait_exit() == 1
    kv.channel.close()
    errors = [line for line in kv.output().splitlines() if "cannot start" in line]
    assert len(errors) == 1, kv.output()
    return errors[0]


@pytest.fixture(scope="module")
def auth_redis():
    with RedisServer("--requirepass", PASSWORD) as server:
        yield server.start(password=PASSWORD)


def test_password_in_the_url(auth_redis: RedisServer, tmp_path: Path) -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:{auth_redis.port}/0"
    kv = KVStoreProcess(tmp_path / "kv.log", "--backend", "redis", "--redis-url", url)
    try:
        roundtrip(kv.wait_serving())
    finally:
        assert kv.stop() == 0
    assert PASSWORD not in kv.output()


def test_password_file(auth_redis: RedisServer, tmp_path: Path) -> None:
    secret = tmp_path / "redis-password"
    secret.write_text(PASSWORD + "\n")  # as `echo` writes it: the newline is not the password
    kv = KVStoreProcess(
        tmp_path / "kv.log",
        *("--backend", "redis", "--redis-url", auth_redis.url),
        *("--redis-password-file", str(secret)),
    )
    try:
        roundtrip(kv.wait_serving())
    finally:
        assert kv.stop() == 0


@pytest.mark.parametrize("how", ["wrong password", "no password", "missing file", "twice"])
def test_bad_credentials_stop_the_kvstore_in_one_line(
    auth_redis: RedisServer, tmp_path: Path, how: str
) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password")
    args = {
        "wrong password": ("--redis-url", auth_redis.url, "--redis-password-file", str(wrong)),
        "no password": ("--redis-url", auth_redis.url),
        "missing file": ("--redis-url", auth_redis.url, "--redis-password-file", "/nonexistent"),
        "twice": (
            "--redis-url",
            f"redis://:{PASSWORD}@127.0.0.1:{auth_redis.port}/0",
            *("--redis-password-file", str(wrong)),
        ),
    }[how]
    kv = KVStoreProcess(tmp_path / "kv.log", "--backend", "redis", *args)
    line = refused_at_start(kv)
    assert PASSWORD not in kv.output() and "not-the-password" not in kv.output()
    expected = {
        "wrong password": "refused our credentials",
        "no password": "refused our credentials",
        "missing file": "/nonexistent",
        "twice": "given twice",
    }[how]
    assert expected.lower() in line.lower(), line


def test_urls_in_messages_hide_the_password() -> None:
    assert redact_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redact_url("rediss://user:pw@[::1]:6380/2") == "rediss://user:***@[::1]:6380/2"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"


@pytest.mark.asyncio
async def test_wrong_password_is_a_backend_error_without_the_password() -> None:
    with RedisServer("--requirepass", PASSWORD) as server:
        server.start(password=PASSWORD)
        backend = RedisBackend(f"redis://:wrong-one@127.0.0.1:{server.port}/0")
        with pytest.raises(BackendError) as err:
            await backend.start()
        await backend.close()
    assert "wrong-one" not in str(err.value) and "***" in str(err.value)


# ---- rediss:// --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory):
    """redis-server on a TLS port only, requiring client certificates (mutual TLS).

    Debian's redis-server is built with TLS (it links libssl); a build without it refuses the
    --tls-port option, which fails this fixture rather than skipping it."""
    pki = make_test_pki(tmp_path_factory.mktemp("pki"))
    port = free_port()
    tls_args = (
        *("--port", "0", "--tls-port", str(port)),
        *("--tls-cert-file", pki.server_cert, "--tls-key-file", pki.server_key),
        *("--tls-ca-cert-file", pki.ca, "--tls-auth-clients", "yes"),
    )
    with RedisServer(*tls_args, port=port) as server:
        server.start(
            f"rediss://127.0.0.1:{port}/0",
            ssl_ca_certs=pki.ca,
            ssl_certfile=pki.client_cert,
            ssl_keyfile=pki.client_key,
        )
        yield f"rediss://127.0.0.1:{port}/0", pki


def test_rediss_with_a_client_certificate(tls_redis, tmp_path: Path) -> None:
    url, pki = tls_redis
    kv = KVStoreProcess(
        tmp_path / "kv.log",
        *("--backend", "redis", "--redis-url", url, "--redis-tls-ca", pki.ca),
        *("--redis-tls-cert", pki.client_cert, "--redis-tls-key", pki.client_key),
    )
    try:
        roundtrip(kv.wait_serving())
    finally:
        assert kv.stop() == 0


@pytest.mark.parametrize("how", ["no client certificate", "unknown CA", "plaintext"])
def test_rediss_refuses_what_does_not_authenticate(tls_redis, tmp_path: Path, how: str) -> None:
    url, pki = tls_redis
    args = {
        "no client certificate": ("--redis-url", url, "--redis-tls-ca", pki.ca),
        "unknown CA": (
            *("--redis-url", url, "--redis-tls-ca", pki.other_ca),
            *("--redis-tls-cert", pki.client_cert, "--redis-tls-key", pki.client_key),
        ),
        "plaintext": ("--redis-url", url.replace("rediss://", "redis://")),
    }[how]
    kv = KVStoreProcess(tmp_path / "kv.log", "--backend", "redis", *args)
    line = refused_at_start(kv)
    if how == "unknown CA":
        assert "certificate verify failed" in line, line


@pytest.mark.asyncio
async def test_tls_files_need_a_rediss_url_and_a_whole_client_pair() -> None:
    with pytest.raises(ValueError, match="plaintext"):
        RedisBackend("redis://127.0.0.1:1/0", tls=RedisTLS(ca="ca.pem"))
    with pytest.raises(ValueError, match="both"):
        RedisBackend("rediss://127.0.0.1:1/0", tls=RedisTLS(cert="c.pem"))
