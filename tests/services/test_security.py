"""services/security.py against real gRPC servers and certificates made by `splitserve certs`.

Mutual TLS both ways (grpc.aio and the blocking twin), every kind of caller that must be refused
(no certificate, plaintext, another CA's certificate, a host name the certificate doesn't name),
the peer's identity as a servicer sees it, and the flags' all-or-nothing rule.
"""

from __future__ import annotations

import asyncio
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from splitserve.launcher.certs import CertBundle
from splitserve.services.security import (
    ENV_CA,
    ENV_CERT,
    ENV_KEY,
    PeerIdentity,
    PublicTLS,
    TLSConfig,
    TLSConfigError,
    add_port,
    add_public_port,
    is_loopback,
    open_channel,
    open_sync_channel,
    peer_identity,
    split_host,
)
from splitserve.v1 import pb, rpc


def files(d: Path, name: str) -> tuple[str, str, str]:
    return str(d / f"{name}.crt"), str(d / f"{name}.key"), str(d / "ca.crt")


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    CertBundle(d).write([("kvstore", "kvstore"), ("decode-0", "worker"), ("ops", "client")])
    return d


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("other-ca")
    CertBundle(d).write([("decode-0", "worker")])
    return d


class WhoAmI(rpc.RegistryServicer):
    """Answers Register with the caller's certificate identity in worker_id's place."""

    async def Register(self, request, context):
        peer = peer_identity(context)
        self.seen = peer
        return pb.RegisterResponse(added=peer is not None)


def serve_sync(tls: TLSConfig | None, address: str = "127.0.0.1:0"):
    server = grpc.server(futures.ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = add_port(server, address, tls)
    server.start()
    return server, port


def check(channel: grpc.Channel) -> int:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return reply.status


# ---- listening ------------------------------------------------------------------------------
@pytest.mark.parametrize("address", ["0.0.0.0:0", "[::]:0", "10.1.2.3:0", "kvstore:50060"])
def test_plaintext_is_refused_beyond_loopback(address):
    server = grpc.server(futures.ThreadPoolExecutor(1))
    with pytest.raises(TLSConfigError, match="--tls-cert, --tls-key and --tls-ca") as info:
        add_port(server, address, None)
    assert "\n" not in str(info.value)  # one line


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.5", "::1", "localhost"])
def test_loopback_counts_as_loopback(host):
    assert is_loopback(host)
    assert split_host(f"[{host}]:1" if ":" in host else f"{host}:1") == host


def test_mutual_tls_on_every_interface(certs):
    server, port = serve_sync(TLSConfig.load(*files(certs, "kvstore")), "0.0.0.0:0")
    try:
        client = TLSConfig.load(*files(certs, "decode-0"))
        with open_sync_channel(f"127.0.0.1:{port}", client) as channel:
            assert check(channel) == health_pb2.HealthCheckResponse.SERVING
        with open_sync_channel(f"localhost:{port}", client) as channel:
            assert check(channel) == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(0)


def refused(channel: grpc.Channel) -> grpc.StatusCode:
    with channel, pytest.raises(grpc.RpcError) as info:
        check(channel)
    return info.value.code()


def test_callers_without_a_valid_certificate_are_refused(certs, other_ca):
    server, port = serve_sync(TLSConfig.load(*files(certs, "kvstore")))
    address = f"127.0.0.1:{port}"
    ca = (certs / "ca.crt").read_bytes()
    try:
        # plaintext, TLS without a client certificate, a certificate of another CA
        assert refused(grpc.insecure_channel(address)) == grpc.StatusCode.UNAVAILABLE
        anonymous = grpc.ssl_channel_credentials(root_certificates=ca)
        assert refused(grpc.secure_channel(address, anonymous)) == grpc.StatusCode.UNAVAILABLE
        stranger = TLSConfig.load(*files(other_ca, "decode-0")[:2], str(certs / "ca.crt"))
        assert refused(open_sync_channel(address, stranger)) == grpc.StatusCode.UNAVAILABLE
        # the server's certificate must name the host dialed
        client = TLSConfig.load(*files(certs, "decode-0"))
        wrong_name = [("grpc.ssl_target_name_override", "somebody-else")]
        assert refused(open_sync_channel(address, client, wrong_name)) == (
            grpc.StatusCode.UNAVAILABLE
        )
    finally:
        server.stop(0)


def test_a_client_refuses_a_server_of_another_ca(certs, other_ca):
    server, port = serve_sync(TLSConfig.load(*files(other_ca, "decode-0")))
    try:
        client = TLSConfig.load(*files(certs, "decode-0"))
        code = refused(open_sync_channel(f"127.0.0.1:{port}", client))
        assert code == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(0)


def test_the_servicer_sees_the_callers_name_and_role(certs):
    async def scenario() -> tuple[PeerIdentity | None, PeerIdentity | None]:
        seen = []
        for tls in (TLSConfig.load(*files(certs, "kvstore")), None):
            server = grpc.aio.server()
            servicer = WhoAmI()
            rpc.add_RegistryServicer_to_server(servicer, server)
            port = add_port(server, "127.0.0.1:0", tls)
            await server.start()
            client = TLSConfig.load(*files(certs, "decode-0")) if tls else None
            async with open_channel(f"127.0.0.1:{port}", client) as channel:
                await rpc.RegistryStub(channel).Register(pb.RegisterRequest(), timeout=5)
            seen.append(servicer.seen)
            await server.stop(0)
        return seen[0], seen[1]

    with_tls, plaintext = asyncio.run(scenario())
    assert with_tls == PeerIdentity(name="decode-0", role="worker")
    assert plaintext is None


def test_public_port_needs_no_client_certificate(certs):
    public = PublicTLS.resolve(*files(certs, "kvstore")[:2])
    assert public is not None
    server = grpc.server(futures.ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = add_public_port(server, "0.0.0.0:0", public)
    server.start()
    try:
        anonymous = grpc.ssl_channel_credentials((certs / "ca.crt").read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{port}", anonymous) as channel:
            assert check(channel) == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(0)
    assert public.ssl_context().verify_mode.name == "CERT_NONE"  # HTTP: API keys, not certs


# ---- flags ----------------------------------------------------------------------------------
def test_all_three_or_none(certs):
    cert, key, ca = files(certs, "kvstore")
    assert TLSConfig.resolve(None, None, None, environ={}) is None
    with pytest.raises(TLSConfigError, match="--tls-key and --tls-ca missing"):
        TLSConfig.resolve(cert, None, None, environ={})
    with pytest.raises(TLSConfigError, match="--tls-ca missing"):
        TLSConfig.resolve(cert, key, None, environ={})
    tls = TLSConfig.resolve(cert, None, None, environ={ENV_KEY: key, ENV_CA: ca})
    assert tls is not None and tls.key == Path(key).read_bytes()
    from_env = TLSConfig.from_env({ENV_CERT: cert, ENV_KEY: key, ENV_CA: ca})
    assert from_env is not None and from_env.cert == tls.cert


def test_bad_files_are_one_line_errors(certs, tmp_path):
    cert, key, ca = files(certs, "kvstore")
    other_key = files(certs, "decode-0")[1]
    with pytest.raises(TLSConfigError, match="is not the key of --tls-cert"):
        TLSConfig.load(cert, other_key, ca)
    with pytest.raises(TLSConfigError, match=r"--tls-ca .* not a PEM file of the right kind"):
        TLSConfig.load(cert, key, key)
    with pytest.raises(TLSConfigError, match=r"--tls-cert .*missing\.crt"):
        TLSConfig.load(str(tmp_path / "missing.crt"), key, ca)
    with pytest.raises(TLSConfigError, match="go together"):
        PublicTLS.resolve(cert, None)


def test_export_env_hands_the_paths_on(certs):
    environ: dict[str, str] = {}
    TLSConfig.load(*files(certs, "kvstore")).export_env(environ)
    assert TLSConfig.from_env(environ) == TLSConfig.load(*files(certs, "kvstore"))
