"""The engine core: requests as sequences, the paged KV block manager with prefix caching, the
continuous-batching scheduler, sampling and the step loop (`LLMEngine`), driving any executor.

No torch.distributed, gRPC, argparse or processes here: where the model runs is an executor's
business (splitserve.executors), and how the engine is configured from flags too.
"""
