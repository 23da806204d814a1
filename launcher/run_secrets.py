"""The secrets of one `splitserve up` run: certificates, the mesh secret and the API key.

    secrets = Secrets(run_dir, tls=not args.insecure, api_key_file=not args.no_auth)
    topology = Topology.from_args(args, LOCAL, secrets)
    api_key = write_secrets(topology, args.api_key)   # None with --no-auth

writes into the run directory (0700) what the topology's flags point at: a CA and one
certificate per service plus `client` (the launcher's own, for its health probes), the mesh
secret (32 random bytes, hex) and the router's keys file, each secret file 0600. The mesh secret
and the keys reach the services as file paths only, never on a command line (any local user
can read another's argv). A run directory given with --secrets-dir is reused: its CA, mesh
secret and key stay, so clients keep working across restarts.
"""

from __future__ import annotations

import secrets as random
from pathlib import Path

from splitserve.launcher.certs import (
    API_KEYS_FILE,
    CLIENT,
    MESH_SECRET_FILE,
    CertBundle,
    role_for,
)
from splitserve.launcher.topology import STAGE_MODULE, ServiceSpec, Topology
from splitserve.services.security import TLSConfig

API_KEY_PREFIX = "sk-ss-"


def new_api_key() -> str:
    return API_KEY_PREFIX + random.token_urlsafe(24)


def write_secrets(topology: Topology, api_key: str | None = None) -> str | None:
    """Everything the topology's services are told to read; returns the API key clients use
    (None when the router asks for none)."""
    s = topology.secrets
    if s is None:
        return None
    bundle = CertBundle(s.dir)
    if s.tls:
        bundle.write([(spec.name, role_of(spec)) for spec in topology.services if spec.launchable])
    bundle.write_secret(MESH_SECRET_FILE, random.token_hex(32))
    if not s.api_key_file:
        return None
    keys_file = Path(s.file(API_KEYS_FILE))
    if api_key is None and keys_file.exists():
        api_key = _first_key(keys_file)
    api_key = api_key or new_api_key()
    keys_file.unlink(missing_ok=True)  # write_secret keeps an existing file
    bundle.write_secret(API_KEYS_FILE, api_key)
    return api_key


def role_of(spec: ServiceSpec) -> str:
    """What its certificate says it is: by what it runs, whatever its name."""
    roles = {
        "splitserve.router": "router",
        "splitserve.kvstore": "kvstore",
        "splitserve.prefill": "worker",
        "splitserve.decode": "worker",
        STAGE_MODULE: "stage",
    }
    return roles.get(spec.module or "") or role_for(spec.name)


def client_tls(topology: Topology) -> TLSConfig | None:
    """The launcher's certificate, for its health probes (None on a plaintext mesh)."""
    s = topology.secrets
    if s is None or not s.tls:
        return None
    return TLSConfig.load(s.file(f"{CLIENT}.crt"), s.file(f"{CLIENT}.key"), s.file("ca.crt"))


def _first_key(path: Path) -> str | None:
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            return line
    return None
