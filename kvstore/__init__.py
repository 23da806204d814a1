"""splitserve kvstore service."""
