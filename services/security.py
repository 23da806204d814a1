"""The internal plane's transport security: mutual TLS between services, plaintext only on loopback.

Every service (router's internal port, prefill, decode, kvstore, pipeline stages) takes

    --tls-cert PATH --tls-key PATH --tls-ca PATH     (or SPLITSERVE_TLS_CERT / _KEY / _CA)

all three or none. With them, a service serves only TLS and asks every caller for a client
certificate signed by the CA (`require_client_auth`), and dials its peers with its own
certificate, checking theirs against the CA and the address's host name. Without them it
serves plaintext, and only on a loopback address: `add_port` refuses anything else in one line.

    tls = TLSConfig.from_args(args)                  # None: plaintext (loopback only)
    port = add_port(server, "0.0.0.0:50060", tls)     # ValueError without tls
    channel = open_channel("kvstore:50060", tls, options)         # grpc.aio
    channel = open_sync_channel("127.0.0.1:50201", tls, options)  # blocking twin

`splitserve certs` makes the CA and the certificates (launcher/certs.py). A certificate's subject
carries the service's name (CN) and its role (OU: router, worker, kvstore, stage, client);
`peer_identity(context)` reads them back from the caller's certificate, which is how the
Registry lets only workers join.

A caller without a valid certificate never gets as far as an RPC: the TLS handshake fails
and gRPC's core writes one line to stderr ("I... ssl_transport_security.cc] Handshake failed
with error ... PEER_DID_NOT_RETURN_A_CERTIFICATE", or WRONG_VERSION_NUMBER for plaintext), so
the refusal shows in the service's log with no code of ours. The line is at gRPC's INFO level
and shown by default; GRPC_VERBOSITY=ERROR hides it (ServiceServer warns at startup then).

Processes that a service starts (its pipeline stages) and code that has no flags of its own
(the engine's stage links, the router's and a worker's channels to peers) get the paths
through the environment: a service's entry point calls `export_env`, they call `from_env`.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import ssl
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

ENV_CERT = "SPLITSERVE_TLS_CERT"
ENV_KEY = "SPLITSERVE_TLS_KEY"
ENV_CA = "SPLITSERVE_TLS_CA"
FLAGS = "--tls-cert, --tls-key and --tls-ca"
ChannelOptions = Sequence[tuple[str, Any]]


class TLSConfigError(ValueError):
    """TLS flags that don't fit together or files that aren't what they claim (one line)."""


@dataclass(frozen=True)
class TLSConfig:
    """A service's certificate, its key and the CA it trusts: paths and their bytes."""

    cert_file: str
    key_file: str
    ca_file: str
    cert: bytes
    key: bytes
    ca: bytes

    @classmethod
    def load(cls, cert_file: str, key_file: str, ca_file: str) -> TLSConfig:
        cert = _read(cert_file, "--tls-cert", b"-----BEGIN CERTIFICATE-----")
        key = _read(key_file, "--tls-key", b"PRIVATE KEY-----")
        ca = _read(ca_file, "--tls-ca", b"-----BEGIN CERTIFICATE-----")
        _check_key_matches(cert, key, cert_file, key_file)
        return cls(cert_file, key_file, ca_file, cert, key, ca)

    @classmethod
    def resolve(
        cls,
        cert_file: str | None,
        key_file: str | None,
        ca_file: str | None,
        environ: Mapping[str, str] = os.environ,
    ) -> TLSConfig | None:
        """From flags, each falling back to its environment variable; None when none is set."""
        paths = {
            "--tls-cert": cert_file or environ.get(ENV_CERT),
            "--tls-key": key_file or environ.get(ENV_KEY),
            "--tls-ca": ca_file or environ.get(ENV_CA),
        }
        missing = [flag for flag, path in paths.items() if not path]
        if len(missing) == 3:
            return None
        if missing:
            raise TLSConfigError(
                f"{FLAGS} go together: {' and '.join(missing)} missing (or set {ENV_CERT}, "
                f"{ENV_KEY} and {ENV_CA})"
            )
        cert, key, ca = paths.values()
        assert cert and key and ca
        return cls.load(cert, key, ca)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TLSConfig | None:
        return cls.resolve(args.tls_cert, args.tls_key, args.tls_ca)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> TLSConfig | None:
        return cls.resolve(None, None, None, environ)

    def export_env(self, environ: MutableMapping[str, str] = os.environ) -> None:
        """Hand the paths to what this process starts (pipeline stages) and to code that has
        no flags of its own (the engine's stage links): both read `from_env`."""
        environ[ENV_CERT] = str(Path(self.cert_file).resolve())
        environ[ENV_KEY] = str(Path(self.key_file).resolve())
        environ[ENV_CA] = str(Path(self.ca_file).resolve())

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=True
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "internal TLS (mutual; all three or none; without them only a loopback address may be "
        "bound; `splitserve certs` makes them)"
    )
    for flag, env, what in (
        ("--tls-cert", ENV_CERT, "this service's certificate"),
        ("--tls-key", ENV_KEY, "its private key"),
        ("--tls-ca", ENV_CA, "the CA that signs every peer's certificate"),
    ):
        g.add_argument(flag, default=None, metavar="PATH", help=f"{what} (env {env})")


def _read(path: str, flag: str, marker: bytes) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise TLSConfigError(f"{flag} {path}: {e.strerror or e}") from None
    if marker not in data:
        raise TLSConfigError(f"{flag} {path} is not a PEM file of the right kind")
    return data


def _check_key_matches(cert: bytes, key: bytes, cert_file: str, key_file: str) -> None:
    """A swapped or stale key fails here in one line, not as a handshake error per call."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        public = x509.load_pem_x509_certificate(cert).public_key()
        private = load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as e:
        raise TLSConfigError(f"{cert_file} / {key_file}: {e}") from None
    if private.public_key() != public:
        raise TLSConfigError(f"--tls-key {key_file} is not the key of --tls-cert {cert_file}")


# ---- listening ------------------------------------------------------------------------------
def split_host(address: str) -> str:
    """'[::1]:50051' -> '::1', '0.0.0.0:1' -> '0.0.0.0', 'kvstore:50060' -> 'kvstore'."""
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def add_port(server: grpc.aio.Server | grpc.Server, address: str, tls: TLSConfig | None) -> int:
    """Bind `address` on an internal service: mutual TLS with `tls`, else plaintext, which only
    a loopback address may have. The bound port (0 if binding failed)."""
    if tls is not None:
        return server.add_secure_port(address, tls.server_credentials())
    if not is_loopback(split_host(address)):
        raise TLSConfigError(
            f"refusing plaintext gRPC on {address}, which is not a loopback address: pass "
            f"{FLAGS} (`splitserve certs` makes them), or bind 127.0.0.1"
        )
    return server.add_insecure_port(address)


@dataclass(frozen=True)
class PublicTLS:
    """The router's public certificate (`--public-tls-cert/--public-tls-key`): server-side TLS
    for its gRPC port and its HTTP port, no client certificates (callers use API keys)."""

    cert_file: str
    key_file: str
    cert: bytes
    key: bytes

    @classmethod
    def resolve(cls, cert_file: str | None, key_file: str | None) -> PublicTLS | None:
        if not cert_file and not key_file:
            return None
        if not cert_file or not key_file:
            raise TLSConfigError("--public-tls-cert and --public-tls-key go together")
        cert = _read(cert_file, "--public-tls-cert", b"-----BEGIN CERTIFICATE-----")
        key = _read(key_file, "--public-tls-key", b"PRIVATE KEY-----")
        _check_key_matches(cert, key, cert_file, key_file)
        return cls(cert_file, key_file, cert, key)

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key, self.cert)])

    def ssl_context(self) -> ssl.SSLContext:
        """For the HTTP front door (aiohttp's TCPSite)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


def add_public_port(
    server: grpc.aio.Server | grpc.Server, address: str, tls: PublicTLS | None
) -> int:
    """The router's public gRPC port: TLS without client certificates when given a certificate
    (callers authenticate with API keys), else plaintext on any address."""
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, tls.server_credentials())


# ---- dialing --------------------------------------------------------------------------------
def open_channel(
    address: str, tls: TLSConfig | None, options: ChannelOptions | None = None
) -> grpc.aio.Channel:
    """A grpc.aio channel to an internal service: mutual TLS with `tls`, else plaintext."""
    opts = list(options or ())
    if tls is None:
        return grpc.aio.insecure_channel(address, options=opts)
    return grpc.aio.secure_channel(address, tls.channel_credentials(), options=opts)


def open_sync_channel(
    address: str, tls: TLSConfig | None, options: ChannelOptions | None = None
) -> grpc.Channel:
    """The blocking twin of `open_channel` (the engine's stage links, health probes)."""
    opts = list(options or ())
    if tls is None:
        return grpc.insecure_channel(address, options=opts)
    return grpc.secure_channel(address, tls.channel_credentials(), options=opts)


# ---- who is calling -------------------------------------------------------------------------
@dataclass(frozen=True)
class PeerIdentity:
    name: str  # the certificate's CN
    role: str | None  # its OU, as `splitserve certs` sets it


def peer_identity(context: grpc.aio.ServicerContext | grpc.ServicerContext) -> PeerIdentity | None:
    """The caller's certificate identity; None on a plaintext connection or without one."""
    pems = (context.auth_context() or {}).get("x509_pem_cert")
    if not pems:
        return None
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(pems[0])
    except ValueError:
        return None
    return PeerIdentity(_attribute(cert, "COMMON_NAME") or "", cert_role(cert))


def cert_role(cert: Any) -> str | None:
    """The role of an `x509.Certificate` made by `splitserve certs` (its subject's OU)."""
    return _attribute(cert, "ORGANIZATIONAL_UNIT_NAME")


def _attribute(cert: Any, oid_name: str) -> str | None:
    from cryptography.x509.oid import NameOID

    values = cert.subject.get_attributes_for_oid(getattr(NameOID, oid_name))
    return str(values[0].value) if values else None
