"""Generates the Python gRPC stubs from splitserve.proto with grpcio-tools: build time only.

Two callers share `generate`, so the stubs are made one way: setup.py's build_py (every regular
and editable install) and scripts/check-stubs.py (CI: regenerates into a temporary folder and
compares with the stubs the installed package imports). `import splitserve.v1` never runs it,
which is why grpcio-tools is a build and dev dependency and not a runtime one. Writes go to a
temporary folder and are renamed into place, so a process importing meanwhile never sees half a
file.
"""

from __future__ import annotations

import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.dirname(os.path.dirname(HERE))  # protos/: the include root
PROTO = os.path.join(HERE, "splitserve.proto")
# Relative to the include root, so the generated imports read `from splitserve.v1 import ...`.
PROTO_NAME = os.path.relpath(PROTO, PROTO_ROOT)
OUTPUTS = ("splitserve_pb2.py", "splitserve_pb2_grpc.py", "splitserve_pb2.pyi")


def generate(out_dir: str) -> None:
    """Writes OUTPUTS for PROTO into `out_dir` (created if missing)."""
    from grpc_tools import protoc  # build-time dependency only

    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            PROTO_NAME,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO}")
        gen = os.path.join(tmp, os.path.dirname(PROTO_NAME))
        for name in OUTPUTS:
            os.replace(os.path.join(gen, name), os.path.join(out_dir, name))


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else HERE
    generate(target)
    print("generated gRPC stubs in", target)
