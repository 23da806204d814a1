"""What the prefill and decode workers share (they never import each other): the worker
process and its flags, the engine on its own thread (engine_loop), the kvstore client and
prefix tier, and the workers' metrics."""
