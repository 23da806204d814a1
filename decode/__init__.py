"""The decode service (also the colocated worker): pulls or computes a prompt's KV and streams
its tokens from the continuous-batching loop (`python -m splitserve.decode`)."""
