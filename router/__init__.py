"""splitserve router: the only public entry point (gRPC Inference + OpenAI-compatible HTTP).

validation.py       one validator for both front doors
registry.py         worker pools (listed and registered at runtime), health checks, load counters
prefix_index.py     which prompt blocks each worker probably caches
policy.py           round_robin, least_tokens, prefix_aware
dispatch.py         route, disaggregate or not, prefill (with retries), decode stream
generation.py       detokenize, stop strings, logprob text, finish and usage
app.py              the core both front doors share (admission, metrics, tracing, abort)
grpc_api.py         splitserve.v1.Inference
registry_api.py     splitserve.v1.Registry: workers register and deregister (data parallelism)
openai_protocol.py  OpenAI JSON in and out
http_api.py         aiohttp endpoints
metrics.py          Prometheus
__main__.py         `python -m splitserve.router`
"""
