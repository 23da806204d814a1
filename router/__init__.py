"""splitserve router service."""
