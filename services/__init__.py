"""gRPC plumbing every splitserve service shares: the server bootstrap (health, reflection,
SIGTERM drain), transport security (mutual TLS on the internal plane) and tracing."""
