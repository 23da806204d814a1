"""splitserve: disaggregated LLM inference as a gRPC service mesh."""

__version__ = "0.1.0"
