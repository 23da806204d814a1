"""The baseline: Hugging Face transformers `generate` with static batching.

Requests are grouped in arrival order into fixed batches, left-padded, and each batch runs until
its longest request is done (`min_new_tokens == max_new_tokens`, so EOS can't end it early).
Only each request's own output length counts as useful tokens; the rest is the price of static
batching, which is what continuous batching is meant to avoid.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from typing import Any

import torch
from transformers import AutoModelForCausalLM, GenerationConfig
from transformers.generation.streamers import BaseStreamer

from splitserve.bench.workload import BenchRequest, DecodeResult, ThroughputResult, batches


@contextlib.contextmanager
def gguf_parsed_once():
    """transformers parses a GGUF file's metadata once for the config, once for the weights and
    once for the tokenizer, and builds gguf's tensor-name map once per tensor; with SmolLM2's
    49k-token vocabulary each parse takes tens of seconds on the CI machine. Inside this block
    each is done once (both are pure functions of their arguments; the reader is only read)."""
    import gguf

    readers: dict[str, Any] = {}
    make_reader, make_map = gguf.GGUFReader, gguf.get_tensor_name_map

    def reader(path, *args, **kwargs):
        if args or kwargs:  # not the plain read-only parse transformers asks for
            return make_reader(path, *args, **kwargs)
        key = os.path.realpath(path)
        if key not in readers:
            readers[key] = make_reader(path)
        return readers[key]

    gguf.GGUFReader = reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(make_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = make_reader, make_map


def load_hf_model(gguf_path: str, dtype: torch.dtype) -> Any:
    folder, name = os.path.split(gguf_path)
    with gguf_parsed_once():
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    # Recent transformers can keep GGUF blocks packed and dequantize in its matmuls; the
    # baseline is meant to be dense weights in `dtype`, like ours, so make sure it is.
    packed = {p.dtype for p in model.parameters()} - {dtype}
    if packed:
        raise RuntimeError(f"HF model has {packed} parameters, not only {dtype}")
    return model.eval()


def pad_token_id(model: Any) -> int:
    gc = model.generation_config
    eos = gc.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    return next((t for t in (gc.pad_token_id, eos) if t is not None), 0)


def greedy_config(model: Any, num_new_tokens: int) -> GenerationConfig:
    """Exactly `num_new_tokens` greedy tokens, whatever defaults the checkpoint ships."""
    gc = model.generation_config
    return GenerationConfig(
        max_new_tokens=num_new_tokens,
        min_new_tokens=num_new_tokens,
        do_sample=False,
        pad_token_id=pad_token_id(model),
        eos_token_id=gc.eos_token_id,
        bos_token_id=gc.bos_token_id,
    )


def left_padded(prompts: list[tuple[int, ...]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, longest prompt), prompts flush right."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[i, width - len(prompt) :] = 1
    return ids, mask


@torch.inference_mode()
def generate_batch(model: Any, batch: list[BenchRequest]) -> int:
    """Run one static batch to its longest output; returns its useful generated tokens."""
    longest = max(r.output_len for r in batch)
    ids, mask = left_padded([r.prompt_token_ids for r in batch], pad_token_id(model))
    out = model.generate(ids, attention_mask=mask, generation_config=greedy_config(model, longest))
    if out.shape[1] - ids.shape[1] != longest:
        raise RuntimeError(f"HF generated {out.shape[1] - ids.shape[1]} tokens, not {longest}")
    return sum(r.output_len for r in batch)


def run_static_batches(
    model: Any, requests: list[BenchRequest], batch_size: int = 8
) -> ThroughputResult:
    start = time.perf_counter()
    useful = sum(generate_batch(model, b) for b in batches(requests, batch_size))
    return ThroughputResult(useful, time.perf_counter() - start)


class TokenTimer(BaseStreamer):
    """Timestamps each `put`: generate puts the prompt first, then every new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.inference_mode()
def run_single_decode(model: Any, prompt: tuple[int, ...], decode_tokens: int) -> DecodeResult:
    """Generate 1 + `decode_tokens` tokens; time from the first new token to the last."""
    ids, mask = left_padded([prompt], pad_token_id(model))
    timer = TokenTimer()
    model.generate(
        ids,
        attention_mask=mask,
        streamer=timer,
        generation_config=greedy_config(model, decode_tokens + 1),
    )
    first, last = timer.times[1], timer.times[-1]  # times[0] is the prompt
    return DecodeResult(len(prompt), len(timer.times) - 2, last - first)


def warm_up(model: Any, requests: list[BenchRequest]) -> None:
    """One short batch, so one-time costs (allocator, kernel selection) aren't timed."""
    short = [BenchRequest(r.request_id, r.prompt_token_ids[:16], 4) for r in requests[:2]]
    generate_batch(model, short)
