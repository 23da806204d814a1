"""The runtime shared by prefill and decode workers: model, paged KV cache, scheduler, sampler."""
