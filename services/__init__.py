"""Plumbing every splitserve service shares, next to the protos.

gRPC server bootstrap, the async engine loop, KV transfer, the kvstore client, tracing and
metrics. Services meet over RPC and never import each other; they all import this.
"""
