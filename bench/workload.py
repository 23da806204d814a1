"""Synthetic request workloads and the result records every benchmark reports.

A workload is a list of `BenchRequest`s drawn from a seeded `random.Random`, so the same
arguments give the same requests on every machine and in every benchmark (engine, mesh, ...).
Prompt ids are random but avoid the low ids where tokenizers keep their special tokens.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

MIN_TOKEN_ID = 100  # ids below this are special tokens (bos, eos, chat markers) in most vocabs


@dataclass(frozen=True)
class WorkloadSpec:
    """How to draw a workload: lengths are inclusive uniform ranges."""

    num_requests: int = 32
    prompt_len: tuple[int, int] = (32, 512)
    output_len: tuple[int, int] = (16, 256)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise ValueError("a workload needs at least one request")
        for name, (lo, hi) in (("prompt_len", self.prompt_len), ("output_len", self.output_len)):
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be a range 1 <= lo <= hi; got {(lo, hi)}")


@dataclass(frozen=True)
class BenchRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    output_len: int  # tokens to generate, exactly (EOS ignored)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def total_len(self) -> int:
        return self.prompt_len + self.output_len


def random_prompt(rng: random.Random, length: int, vocab_size: int) -> tuple[int, ...]:
    if vocab_size <= MIN_TOKEN_ID:
        raise ValueError(f"vocab_size {vocab_size} leaves no ids >= {MIN_TOKEN_ID}")
    return tuple(rng.randrange(MIN_TOKEN_ID, vocab_size) for _ in range(length))


def make_workload(spec: WorkloadSpec, vocab_size: int) -> list[BenchRequest]:
    """The requests in arrival order; the same spec and vocab always give the same list."""
    rng = random.Random(spec.seed)
    requests = []
    for i in range(spec.num_requests):
        prompt_len = rng.randint(*spec.prompt_len)
        output_len = rng.randint(*spec.output_len)
        prompt = random_prompt(rng, prompt_len, vocab_size)
        requests.append(BenchRequest(f"req-{i}", prompt, output_len))
    return requests


def total_prompt_tokens(requests: list[BenchRequest]) -> int:
    return sum(r.prompt_len for r in requests)


def total_output_tokens(requests: list[BenchRequest]) -> int:
    return sum(r.output_len for r in requests)


def batches(requests: list[BenchRequest], size: int) -> list[list[BenchRequest]]:
    """Consecutive groups of `size` in arrival order (the last may be shorter)."""
    if size < 1:
        raise ValueError("batch size must be >= 1")
    return [requests[i : i + size] for i in range(0, len(requests), size)]


def check_generated(who: str, generated: int, requests: Sequence[BenchRequest]) -> None:
    """Every request gave exactly its output length (EOS is ignored): else the run is wrong."""
    expected = sum(r.output_len for r in requests)
    if generated != expected:
        raise RuntimeError(f"{who} generated {generated} tokens, not {expected}")


def count_same(ours: dict[str, list[int]], reference: dict[str, list[int]]) -> int:
    """Requests (by id) whose tokens equal the reference run's: greedy runs must agree."""
    return sum(1 for rid, toks in reference.items() if ours.get(rid) == toks)


@dataclass
class ThroughputResult:
    """Useful generated tokens over the wall time of a whole workload (prefill included)."""

    generated_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class DecodeResult:
    """One request's decode phase: tokens after the first one, over the time after the first."""

    prompt_len: int
    decode_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.decode_tokens / self.seconds if self.seconds > 0 else 0.0


def ratio(ours: float, baseline: float) -> float:
    """ours / baseline, with a zero (unmeasured) baseline giving 0 rather than a crash."""
    return ours / baseline if baseline > 0 else 0.0
