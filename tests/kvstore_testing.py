"""Helpers shared by the kvstore tests: keys, valid payloads, free ports, a throwaway Redis, a
Redis process the test can kill and restart on its port, a kvstore process, test certificates."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ports import free_port

from splitserve.v1 import rpc
from splitserve.wire.kv_payload import encode_payload

SHARED_REDIS_URL = "redis://127.0.0.1:6379/0"


def make_keys(n: int, tag: str = "") -> list[bytes]:
    """n distinct 32-byte keys, distinct across tests (tag) and runs (uuid)."""
    run = uuid.uuid4().hex
    return [hashlib.sha256(f"{run}:{tag}:{i}".encode()).digest() for i in range(n)]


def payload(key: bytes, size: int = 64, secret: bytes | None = None) -> bytes:
    """A valid payload for `key` carrying `size` bytes (signed with `secret`, when given)."""
    data = hashlib.sha256(key).digest() * (size // 32 + 1)
    return encode_payload(key, "uint8", (size,), data[:size], secret)


def unique_prefix() -> bytes:
    return f"splitserve:test:{uuid.uuid4().hex}:".encode()


def delete_prefix(url: str, prefix: bytes) -> None:
    """Removes what a test left under its own prefix on a shared Redis (never FLUSHDB)."""
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=prefix + b"*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@contextlib.contextmanager
def throwaway_redis(*extra_args: str) -> Iterator[str]:
    """A private redis-server on a free port (no persistence), killed afterwards; yields its URL."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen([*args, *extra_args], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        _wait_for_redis(url, proc)
        yield url
    finally:
        proc.kill()
        proc.wait(timeout=5)


def _wait_for_redis(url: str, proc: subprocess.Popen, timeout_s: float = 5.0, **kwargs) -> None:
    client = redis.Redis.from_url(url, socket_connect_timeout=0.2, **kwargs)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {proc.returncode}")
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    return
            time.sleep(0.02)
        raise TimeoutError(f"redis-server at {url} did not answer in {timeout_s}s")
    finally:
        client.close()


class RedisServer:
    """A private redis-server the test can SIGKILL, SIGSTOP and restart on the same port."""

    def __init__(self, *extra_args: str, port: int | None = None) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed")
        self.port = port or free_port()
        self.args = [
            exe, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *extra_args,
        ]  # fmt: skip
        if "--tls-port" not in extra_args:
            self.args += ["--port", str(self.port)]
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, ping_url: str | None = None, **ping_kwargs) -> RedisServer:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL)
        _wait_for_redis(ping_url or self.url, self.proc, **ping_kwargs)
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye to its clients."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
        self.kill()


class KVStoreProcess:
    """`python -m splitserve.kvstore` as a child process, with a sync channel to it."""

    SERVICE = "splitserve.v1.KVStore"

    def __init__(self, log_path: Path, *args: str) -> None:
        self.port = free_port()
        self.log_path = log_path
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "splitserve.kvstore", "--port", str(self.port), *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "SPLITSERVE_OTEL_EXPORTER": "none"},
        )
        self.address = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.address)
        self.stub = rpc.KVStoreStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def health_status(self, service: str = SERVICE) -> int:
        request = health_pb2.HealthCheckRequest(service=service)
        return self.health.Check(request, timeout=1.0).status

    def wait_serving(self, timeout_s: float = 20.0) -> KVStoreProcess:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"kvstore exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if self.health_status() == health_pb2.HealthCheckResponse.SERVING:
                    return self
            except grpc.RpcError:
                time.sleep(0.05)
        pytest.fail(f"kvstore not SERVING after {timeout_s}s:\n{self.output()}")

    def wait_exit(self, timeout_s: float = 30.0) -> int:
        return self.proc.wait(timeout=timeout_s)

    def output(self) -> str:
        return self.log_path.read_text()  # the child writes it; we only read

    def stop(self) -> int:
        """SIGTERM, then the exit code (killed and failed if it takes over 5 s)."""
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # in case a test left it stopped
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"kvstore ignored SIGTERM for 5 s:\n{self.output()}")
        finally:
            self._log.close()


# ---- certificates for rediss:// ---------------------------------------------------------------
@dataclass(frozen=True)
class TestPKI:
    ca: str  # the CA's certificate
    server_cert: str  # for 127.0.0.1 / localhost
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str  # a CA that signed none of these


def make_test_pki(folder: Path) -> TestPKI:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(filename: str, data: bytes) -> str:
        path = folder / filename
        path.write_bytes(data)
        return str(path)

    def authority(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(name(cn))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        return key, cert

    ca_key, ca_cert = authority("splitserve test CA")
    _, other_cert = authority("someone else's CA")

    def leaf(cn: str, usage, sans: list[x509.GeneralName]) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)

    server_sans = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    server_cert, server_key = leaf("redis", ExtendedKeyUsageOID.SERVER_AUTH, server_sans)
    client_cert, client_key = leaf("kvstore", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    pem = serialization.Encoding.PEM
    return TestPKI(
        ca=write("ca.pem", ca_cert.public_bytes(pem)),
        server_cert=write("redis.pem", server_cert),
        server_key=write("redis-key.pem", server_key),
        client_cert=write("client.pem", client_cert),
        client_key=write("client-key.pem", client_key),
        other_ca=write("other-ca.pem", other_cert.public_bytes(pem)),
    )
