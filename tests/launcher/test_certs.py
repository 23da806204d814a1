"""`splitserve certs` as an operator runs it, and the run directory `splitserve up` writes."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from splitserve.launcher import up
from splitserve.launcher.certs import role_for
from splitserve.launcher.run_secrets import client_tls, write_secrets
from splitserve.services.security import cert_role


def certs(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "splitserve.cli", "certs", *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def sans(cert: x509.Certificate) -> set[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {*ext.get_values_for_type(x509.DNSName),
            *(str(a) for a in ext.get_values_for_type(x509.IPAddress))}  # fmt: skip


def test_a_ca_and_one_certificate_per_service(tmp_path):
    out = tmp_path / "certs"
    argv = ["--out", str(out), "--service", "router", "--service", "decode-3"]
    proc = certs(*argv, "--service", "gpu-7:worker", "--san", "10.0.0.7", "--san", "gpu.lan")
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_mode & 0o777 == 0o700
    ca = load(out / "ca.crt")
    for name, role in [("router", "router"), ("decode-3", "worker"), ("gpu-7", "worker"),
                       ("client", "client")]:  # fmt: skip
        cert = load(out / f"{name}.crt")
        cert.verify_directly_issued_by(ca)
        assert cert_role(cert) == role
        assert cert.subject.rfc4514_string().startswith(f"CN={name},OU={role}")
        # hostname verification passes on one machine and on a compose network
        assert sans(cert) == {name, "localhost", "127.0.0.1", "::1", "10.0.0.7", "gpu.lan"}
        assert (out / f"{name}.key").stat().st_mode & 0o777 == 0o600
    assert (out / "ca.key").stat().st_mode & 0o777 == 0o600


def test_rerunning_keeps_what_is_valid_and_force_starts_over(tmp_path):
    out = tmp_path / "certs"
    assert certs("--out", str(out), "--service", "kvstore").returncode == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    again = certs("--out", str(out), "--service", "kvstore")
    assert again.returncode == 0 and "nothing new" in again.stdout
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    # A new service reuses the CA; a changed SAN list re-issues (with the same CA) too.
    assert certs("--out", str(out), "--service", "kvstore", "--san", "kv.lan").returncode == 0
    assert (out / "ca.crt").read_bytes() == first["ca.crt"]
    assert (out / "kvstore.crt").read_bytes() != first["kvstore.crt"]
    assert "kv.lan" in sans(load(out / "kvstore.crt"))
    assert certs("--out", str(out), "--service", "kvstore", "--force").returncode == 0
    assert (out / "ca.crt").read_bytes() != first["ca.crt"]
    load(out / "kvstore.crt").verify_directly_issued_by(load(out / "ca.crt"))


def test_secrets_are_written_once(tmp_path):
    out = tmp_path / "s"
    assert certs("--out", str(out), "--mesh-secret", "--redis-password").returncode == 0
    secret = (out / "mesh-secret").read_text().strip()
    assert len(bytes.fromhex(secret)) == 32
    assert (out / "mesh-secret").stat().st_mode & 0o777 == 0o600
    password = (out / "redis-password").read_text()
    assert certs("--out", str(out), "--mesh-secret", "--redis-password").returncode == 0
    assert (out / "mesh-secret").read_text().strip() == secret
    assert (out / "redis-password").read_text() == password


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--service", "web"], "can't tell its role from the name; write web:ROLE"),
        (["--service", "web:admin"], "unknown role 'admin'"),
        (["--service", "bad name!"], "a name is 1-63 letters"),
        (["--san", "not a host"], "neither a DNS name nor an IP address"),
        (["--days", "0"], "--days must be at least 1"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, argv, message):
    proc = certs("--out", str(tmp_path / "c"), *argv)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "c").exists()


def test_a_broken_ca_is_named(tmp_path):
    out = tmp_path / "c"
    assert certs("--out", str(out)).returncode == 0
    (out / "ca.key").write_bytes((out / "client.key").read_bytes())  # not the CA's key
    proc = certs("--out", str(out))
    assert proc.returncode == 2 and "ca.key is not the key of its certificate" in proc.stderr
    (out / "ca.key").unlink()
    proc = certs("--out", str(out))
    assert proc.returncode == 2 and "ca.key is missing" in proc.stderr


@pytest.mark.parametrize(
    ("name", "role"),
    [("router", "router"), ("kvstore", "kvstore"), ("prefill-0", "worker"),
     ("colocated-2", "worker"), ("decode-0-stage-1", "stage"), ("client", "client")],
)  # fmt: skip
def test_the_topologys_names_have_roles(name, role):
    assert role_for(name) == role


def up_args(*argv: str) -> argparse.Namespace:
    return up.build_parser().parse_args(list(argv))


def test_up_writes_every_file_its_services_are_told_to_read(tmp_path):
    args = up_args("--pipeline-stages", "2", "--stage-services")
    topology = up.local_topology(args, str(tmp_path / "run"))
    key = write_secrets(topology)
    assert key is not None and key.startswith("sk-ss-") and len(key) > 30
    named = {a for s in topology.services for a in s.args if a.startswith(str(tmp_path))}
    assert len(named) > 10
    for path in named:
        assert Path(path).is_file(), path
    assert (tmp_path / "run" / "api-keys").read_text().split() == [key]
    assert (tmp_path / "run" / "api-keys").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "run" / "mesh-secret").stat().st_mode & 0o777 == 0o600
    assert client_tls(topology) is not None
    # The same directory again: the same key and CA (clients keep working after a restart).
    ca = (tmp_path / "run" / "ca.crt").read_bytes()
    assert write_secrets(topology) == key and (tmp_path / "run" / "ca.crt").read_bytes() == ca
    assert write_secrets(topology, "sk-mine-12345") == "sk-mine-12345"


def test_up_opt_outs_write_less(tmp_path):
    insecure = up.local_topology(up_args("--insecure", "--no-auth"), str(tmp_path))
    assert write_secrets(insecure) is None
    assert client_tls(insecure) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mesh-secret"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--api-key", "short"], "8-256 printable characters"),
        (["--api-key", "has a space in it"], "without spaces"),
        (["--api-key", "sk-12345678", "--no-auth"], "contradict"),
    ],
)
def test_up_refuses_a_bad_api_key_in_one_line(argv, message):
    proc = subprocess.run(
        [sys.executable, "-m", "splitserve.cli", "up", *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
