"""Generates the Python gRPC stubs from splitserve.proto with grpcio-tools.

Run at install time (setup.py's build_py and scripts/setup.sh) and, as a fallback, on first
import when the stubs are missing or older than the .proto. Writes go to a temporary folder
and are renamed into place, so processes importing at once never see half a file.
"""

from __future__ import annotations

import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.dirname(os.path.dirname(HERE))  # protos/
PROTO = os.path.join(HERE, "splitserve.proto")
OUTPUTS = ("splitserve_pb2.py", "splitserve_pb2_grpc.py", "splitserve_pb2.pyi")


def stubs_are_fresh(out_dir: str = HERE) -> bool:
    src = os.path.getmtime(PROTO)
    paths = [os.path.join(out_dir, name) for name in OUTPUTS]
    return all(os.path.exists(p) and os.path.getmtime(p) >= src for p in paths)


def generate(out_dir: str = HERE) -> None:
    from grpc_tools import protoc  # build-time dependency only

    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        rel = os.path.relpath(PROTO, PROTO_ROOT)
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            rel,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO}")
        gen = os.path.join(tmp, os.path.dirname(rel))
        for name in OUTPUTS:
            os.replace(os.path.join(gen, name), os.path.join(out_dir, name))


def ensure_stubs() -> None:
    if not stubs_are_fresh():
        generate()


if __name__ == "__main__":
    generate(sys.argv[1] if len(sys.argv) > 1 else HERE)
    print("generated gRPC stubs in", sys.argv[1] if len(sys.argv) > 1 else HERE)
