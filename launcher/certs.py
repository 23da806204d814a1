"""`splitserve certs`: a private CA and one certificate per service, for the internal plane.

    splitserve certs --out certs/ --service router --service kvstore --service prefill-0 \\
        --service decode-0 --service gpu-box-7:worker --san 10.0.0.7

writes, in DIR:

    ca.crt ca.key              the authority every service trusts (--tls-ca); kept and reused
                               on later runs (a new one only with --force)
    NAME.crt NAME.key          one per --service, plus `client` (the launcher's and operator
                               tools' identity): --tls-cert / --tls-key
    mesh-secret                with --mesh-secret: 32 random bytes, hex (KV block signing)
    redis-password             with --redis-password: for Redis AUTH

Keys are EC P-256, written with mode 0600. Each certificate names its service in the subject's
CN and carries SANs for NAME, localhost, 127.0.0.1 and ::1 (plus every --san), so hostname
verification passes both on one machine and on a compose network, and it is good for both
ends of a connection (serverAuth and clientAuth): a service that serves also dials.

The **role** is the subject's OU (organizationalUnitName): router, worker, kvstore, stage or
client. `splitserve.v1.Registry` accepts only `worker` certificates (services/security.py reads
the role back from the peer's certificate). NAME:ROLE gives it; otherwise it follows from the
name (router, kvstore, client; prefill*/decode*/colocated* are workers; *-stage-N are stages).

Re-running is idempotent: an existing CA is reused, and a service certificate that is still
valid for months, signed by that CA, with the same role and SANs is left as it is; secrets
that exist are never rewritten.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitserve.launcher import LaunchError

ROLES = ("router", "worker", "kvstore", "stage", "client")
CLIENT = "client"
CA_DAYS = 3650
DEFAULT_DAYS = 365
RENEW_BEFORE = datetime.timedelta(days=30)  # a certificate closer to its end is re-issued
CLOCK_SKEW = datetime.timedelta(minutes=5)  # valid from a little before now
LOOPBACK_SANS = ("localhost", "127.0.0.1", "::1")
MESH_SECRET_FILE = "mesh-secret"
REDIS_PASSWORD_FILE = "redis-password"
API_KEYS_FILE = "api-keys"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def make(
    out: str,
    services: list[str],
    sans: list[str],
    days: int = DEFAULT_DAYS,
    force: bool = False,
    mesh_secret: bool = False,
    redis_password: bool = False,
) -> tuple[Path, list[str]]:
    """What `splitserve certs` does: the CA and each `NAME[:ROLE]` service's certificate in
    `out` (plus the mesh secret and a Redis password if asked); the directory and the files
    written (nothing already there and still good is written again)."""
    parsed = [parse_service(s) for s in services]
    if days < 1:
        raise LaunchError(f"--days must be at least 1; got {days}")
    checked = [check_san(s) for s in sans]
    bundle = CertBundle(Path(out))
    written = bundle.write(parsed, checked, days=days, force=force)
    if mesh_secret:
        written += bundle.write_secret(MESH_SECRET_FILE, secrets.token_hex(32))
    if redis_password:
        written += bundle.write_secret(REDIS_PASSWORD_FILE, secrets.token_urlsafe(32))
    return bundle.dir, written


# --- input -----------------------------------------------------------------------------------


def role_for(name: str) -> str:
    """The role a service's name implies, or LaunchError."""
    if name in ("router", "kvstore", CLIENT):
        return name
    if re.fullmatch(r".+-stage-\d+", name):
        return "stage"
    if name.split("-", 1)[0] in ("prefill", "decode", "colocated"):
        return "worker"
    raise LaunchError(
        f"--service {name}: can't tell its role from the name; write {name}:ROLE "
        f"(ROLE one of {', '.join(ROLES)})"
    )


def parse_service(text: str) -> tuple[str, str]:
    name, sep, role = text.partition(":")
    if not _NAME.match(name):
        raise LaunchError(
            f"--service {text!r}: a name is 1-63 letters, digits, '.', '_' or '-' (a hostname)"
        )
    if not sep:
        return name, role_for(name)
    if role not in ROLES:
        raise LaunchError(f"--service {text!r}: unknown role {role!r}; one of {', '.join(ROLES)}")
    return name, role


def check_san(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    labels = text.rstrip(".").split(".")
    if not text or not all(re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", x)
                           for x in labels):  # fmt: skip
        raise LaunchError(f"--san {text!r} is neither a DNS name nor an IP address")
    return text.rstrip(".")


# --- the files -------------------------------------------------------------------------------


@dataclass
class Authority:
    key: Any  # ec.EllipticCurvePrivateKey
    cert: Any  # x509.Certificate


class CertBundle:
    """A directory of one CA and the certificates and secrets made with it."""

    def __init__(self, directory: Path | str) -> None:
        self.dir = Path(directory)

    def path(self, name: str) -> Path:
        return self.dir / name

    def cert_path(self, name: str) -> Path:
        return self.dir / f"{name}.crt"

    def key_path(self, name: str) -> Path:
        return self.dir / f"{name}.key"

    @property
    def ca_path(self) -> Path:
        return self.dir / "ca.crt"

    def write(
        self,
        services: Iterable[tuple[str, str]],
        extra_sans: Sequence[str] = (),
        *,
        days: int = DEFAULT_DAYS,
        force: bool = False,
    ) -> list[str]:
        """CA (reused unless `force`), then each service's and the client's certificate;
        returns the files it wrote."""
        wanted = dict(services)
        wanted.setdefault(CLIENT, CLIENT)
        self._make_dir()
        ca, written = self._authority(force)
        for name, role in wanted.items():
            sans = _sans(name, extra_sans)
            if not force and not written and self._current(ca, name, role, sans):
                continue
            key, cert = _issue(ca, name, role, sans, days)
            self._write(self.key_path(name), _key_pem(key), 0o600)
            self._write(self.cert_path(name), _cert_pem(cert), 0o644)
            written.append(f"{name}.crt")
        return written

    def write_secret(self, name: str, value: str) -> list[str]:
        """A secret file (mode 0600), unless one is there already."""
        self._make_dir()
        if self.path(name).exists():
            return []
        self._write(self.path(name), (value + "\n").encode(), 0o600)
        return [name]

    def _make_dir(self) -> None:
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise LaunchError(f"cannot create {self.dir}: {e.strerror}") from None
        if not self.dir.is_dir():
            raise LaunchError(f"{self.dir} is not a directory")

    def _authority(self, force: bool) -> tuple[Authority, list[str]]:
        key_file, cert_file = self.key_path("ca"), self.ca_path
        if not force and (key_file.exists() or cert_file.exists()):
            return _load_authority(key_file, cert_file), []
        ca = _new_authority()
        self._write(key_file, _key_pem(ca.key), 0o600)
        self._write(cert_file, _cert_pem(ca.cert), 0o644)
        return ca, ["ca.crt"]

    def _current(self, ca: Authority, name: str, role: str, sans: list[str]) -> bool:
        """Is NAME's certificate there, signed by `ca`, for `role` and `sans`, not ending soon?"""
        from cryptography import x509

        from splitserve.services.security import cert_role

        try:
            cert = x509.load_pem_x509_certificate(self.cert_path(name).read_bytes())
            _check_pair(self.key_path(name), cert)
            cert.verify_directly_issued_by(ca.cert)
        except (OSError, ValueError, TypeError, LaunchError):
            return False
        except Exception:  # cryptography's InvalidSignature is not a ValueError
            return False
        now = datetime.datetime.now(datetime.UTC)
        return (
            cert_role(cert) == role
            and sorted(_cert_sans(cert)) == sorted(sans)
            and cert.not_valid_after_utc - now > RENEW_BEFORE
        )

    def _write(self, path: Path, data: bytes, mode: int) -> None:
        """Atomically, never world-readable while being written."""
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, mode)  # O_CREAT's mode is cut by the umask, and ignored if it existed
            os.replace(tmp, path)
        except OSError as e:
            raise LaunchError(f"cannot write {path}: {e.strerror}") from None


# --- X.509 -----------------------------------------------------------------------------------


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _new_authority() -> Authority:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "splitserve"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"splitserve CA {secrets.token_hex(4)}"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - CLOCK_SKEW)
        .not_valid_after(_now() + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return Authority(key, cert)


def _issue(ca: Authority, name: str, role: str, sans: list[str], days: int):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "splitserve"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    alt_names: list[x509.GeneralName] = []
    for san in sans:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(san)))
        except ValueError:
            alt_names.append(x509.DNSName(san))
    both_ends = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]  # serve, dial
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - CLOCK_SKEW)
        .not_valid_after(min(_now() + datetime.timedelta(days=days), ca.cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True, key_agreement=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage(both_ends), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    return key, cert


def _key_usage(**allowed: bool):
    from cryptography import x509

    names = (
        *("digital_signature", "content_commitment", "key_encipherment", "data_encipherment"),
        *("key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"),
    )
    return x509.KeyUsage(**{name: allowed.get(name, False) for name in names})


def _load_authority(key_file: Path, cert_file: Path) -> Authority:
    from cryptography import x509

    for path in (key_file, cert_file):
        if not path.exists():
            raise LaunchError(f"{path} is missing while its pair is there; rerun with --force")
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        key = _check_pair(key_file, cert)
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (OSError, ValueError, x509.ExtensionNotFound) as e:
        raise LaunchError(
            f"the CA in {cert_file.parent} can't be used ({e}); rerun with --force"
        ) from None
    if not constraints.ca:
        raise LaunchError(f"{cert_file} is not a CA certificate; rerun with --force")
    return Authority(key, cert)


def _check_pair(key_file: Path, cert) -> Any:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(key_file.read_bytes(), password=None)
    if key.public_key() != cert.public_key():
        raise LaunchError(f"{key_file} is not the key of its certificate")
    return key


def _sans(name: str, extra: Sequence[str]) -> list[str]:
    out: list[str] = []
    for san in (name, *LOOPBACK_SANS, *extra):
        if san not in out:
            out.append(san)
    return out


def _cert_sans(cert) -> list[str]:
    from cryptography import x509

    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*ext.get_values_for_type(x509.DNSName),
            *(str(ip) for ip in ext.get_values_for_type(x509.IPAddress))]  # fmt: skip


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)
