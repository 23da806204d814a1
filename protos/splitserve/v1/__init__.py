"""gRPC stubs for package splitserve.v1, generated from splitserve.proto (never hand-edited).

from splitserve.v1 import pb, rpc   # messages, service stubs/servicers
"""

from splitserve.v1._build import ensure_stubs

ensure_stubs()

from splitserve.v1 import splitserve_pb2 as pb  # noqa: E402
from splitserve.v1 import splitserve_pb2_grpc as rpc  # noqa: E402

__all__ = ["pb", "rpc"]
