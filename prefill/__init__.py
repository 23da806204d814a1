"""The prefill service: computes a prompt's KV and first token and leases the KV to a decode
worker (service.py, leases.py; `python -m splitserve.prefill`)."""
