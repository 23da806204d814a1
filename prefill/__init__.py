"""splitserve prefill service."""
