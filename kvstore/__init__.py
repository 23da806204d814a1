"""The kvstore service: content-addressed KV blocks kept as bytes in Redis or in memory; it
checks payloads' structure (and signatures, given the mesh secret) but never imports the model
(`python -m splitserve.kvstore`)."""
