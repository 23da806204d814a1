"""gRPC stubs for package splitserve.v1, generated from splitserve.proto (never hand-edited).

from splitserve.v1 import pb, rpc   # messages, service stubs/servicers

The stubs are made when the package is built (setup.py runs _build.generate for `pip install .`
and `pip install -e .` alike); importing only imports them, it never runs protoc.
"""

try:
    import splitserve.v1.splitserve_pb2 as pb
    import splitserve.v1.splitserve_pb2_grpc as rpc
except ModuleNotFoundError as err:
    if err.name not in {f"{__name__}.splitserve_pb2", f"{__name__}.splitserve_pb2_grpc"}:
        raise  # something the stubs import (grpc, protobuf), not the stubs themselves
    raise ImportError(
        f"{__name__}: the generated gRPC stubs are missing ({err.name}); they are made when "
        "splitserve is built, so reinstall it: `pip install -e .` in a checkout (or "
        "scripts/setup.sh), `pip install .` otherwise"
    ) from err

__all__ = ["pb", "rpc"]
