"""splitserve decode service."""
