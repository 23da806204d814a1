"""Measured machine peaks, and what fraction of them a run achieved.

Peaks are measured in the same process as the run, because on a shared or throttled machine a
datasheet number says little: peak FLOP/s is the best of a few square matmuls, through
`torch.mm` and (where this torch has it) the oneDNN packed matmul our engine uses, whichever is
faster here; peak bandwidth the best of a few large tensor copies (bytes read + bytes written).

What a run achieved is estimated from the model's shape, not counted by hardware counters:

* FLOPs: 2 x (matmul weights a token passes through) per processed token, 2 x (lm_head) per
  sampled token, plus the attention score and value products (4 x layers x heads x head_dim x
  context per token). Norms, RoPE, activations and softmax are left out (a few percent).
  Only useful work counts: tokens recomputed after a preemption or hidden behind padding don't.
* Decode bandwidth: in a step where every sequence decodes one token, the weights are read
  once (they don't fit in cache) and each sequence's KV is read once; activations are ignored.
  The engine benchmark counts the weights as its linear backend stores them (4-/8-bit blocks
  are fewer bytes than fp32); `decode_weight_bytes` is the dense count.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from splitserve.bench.workload import BenchRequest, ratio
from splitserve.engine.config import ModelConfig

MIB = 1024 * 1024


# ---- peaks ---------------------------------------------------------------------------------
def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of `repeats` timed calls, after one untimed warm-up call."""
    fn()
    best = float("inf")
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_matmul_flops(dtype: torch.dtype, n: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of an (n, n) @ (n, n) matmul in `dtype` (2 n^3 FLOPs per call): the faster of
    `torch.mm` and oneDNN with the weight packed (on some CPUs, BLAS is the slower one)."""
    from splitserve.model.cpu_linear import onednn_available

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    seconds = best_seconds(lambda: torch.mm(a, b, out=out), repeats)
    if dtype in (torch.float32, torch.bfloat16) and onednn_available(dtype):
        packed = torch.ops.mkldnn._reorder_linear_weight(b, None)
        linear = torch.ops.mkldnn._linear_pointwise
        seconds = min(
            seconds, best_seconds(lambda: linear(a, packed, None, "none", [], ""), repeats)
        )
    return 2 * n**3 / seconds


def measure_copy_bandwidth(num_bytes: int = 256 * MIB, repeats: int = 5) -> float:
    """Bytes/s of copying a `num_bytes` tensor into another: it reads and writes num_bytes."""
    src = torch.ones(num_bytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    seconds = best_seconds(lambda: dst.copy_(src), repeats)
    return 2 * src.numel() * src.element_size() / seconds


@dataclass
class Peaks:
    matmul_flops: dict[str, float]  # dtype name -> FLOP/s
    copy_bandwidth: float  # bytes/s
    matmul_size: int
    copy_bytes: int

    def best(self, other: Peaks) -> Peaks:
        """The higher of two measurements of each: contention only ever lowers a peak."""
        flops = {d: max(f, other.matmul_flops.get(d, 0.0)) for d, f in self.matmul_flops.items()}
        bandwidth = max(self.copy_bandwidth, other.copy_bandwidth)
        return Peaks(flops, bandwidth, self.matmul_size, self.copy_bytes)


def measure_peaks(dtypes: dict[str, torch.dtype], matmul_size: int, copy_bytes: int) -> Peaks:
    flops = {name: measure_matmul_flops(dt, matmul_size) for name, dt in dtypes.items()}
    return Peaks(flops, measure_copy_bandwidth(copy_bytes), matmul_size, copy_bytes)


# ---- model arithmetic ----------------------------------------------------------------------
def body_matmul_params(cfg: ModelConfig) -> int:
    """Weights of the decoder layers' matmuls: what every token passes through."""
    h, d = cfg.hidden_size, cfg.head_dim
    attn = h * (cfg.num_heads + 2 * cfg.num_kv_heads) * d + cfg.num_heads * d * h
    mlp = 3 * h * cfg.intermediate_size
    return cfg.num_layers * (attn + mlp)


def head_params(cfg: ModelConfig) -> int:
    """The lm_head: used only for the tokens whose logits are sampled."""
    return cfg.vocab_size * cfg.hidden_size


def attention_flops(cfg: ModelConfig, num_tokens: int) -> int:
    """QK^T and PV FLOPs of a causal pass over `num_tokens` positions (token p sees p + 1)."""
    per_pair = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim
    return per_pair * num_tokens * (num_tokens + 1) // 2


def request_flops(cfg: ModelConfig, prompt_len: int, output_len: int) -> int:
    """Useful FLOPs to serve one request: the last generated token is never fed back."""
    processed = prompt_len + output_len - 1
    return (
        2 * body_matmul_params(cfg) * processed
        + 2 * head_params(cfg) * output_len
        + attention_flops(cfg, processed)
    )


def workload_flops(cfg: ModelConfig, requests: Iterable[BenchRequest]) -> int:
    return sum(request_flops(cfg, r.prompt_len, r.output_len) for r in requests)


def module_bytes(model: torch.nn.Module) -> int:
    """Bytes of a module's parameters (tied weights counted once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    return cfg.kv_bytes_per_token * dtype.itemsize


def decode_weight_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Weights one decode step streams from memory: every matmul weight plus the lm_head."""
    return (body_matmul_params(cfg) + head_params(cfg)) * dtype.itemsize


# ---- achieved ------------------------------------------------------------------------------
@dataclass
class DecodeTraffic:
    """Bytes a run's pure-decode steps had to move, and the time they took."""

    steps: int = 0
    seconds: float = 0.0
    weight_bytes: int = 0
    kv_bytes: int = 0

    def add_step(self, seconds: float, weight_bytes: int, kv_bytes: int) -> None:
        self.steps += 1
        self.seconds += seconds
        self.weight_bytes += weight_bytes
        self.kv_bytes += kv_bytes

    @property
    def bytes_per_s(self) -> float:
        total = self.weight_bytes + self.kv_bytes
        return total / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Roofline:
    """A run's achieved FLOP/s and decode bandwidth; fractions of peaks measured elsewhere."""

    model_flops: int
    seconds: float
    decode: DecodeTraffic

    @property
    def achieved_flops(self) -> float:
        return self.model_flops / self.seconds if self.seconds > 0 else 0.0

    def flops_fraction(self, peak_flops: float) -> float:
        return ratio(self.achieved_flops, peak_flops)

    def bandwidth_fraction(self, peak_bandwidth: float) -> float:
        return ratio(self.decode.bytes_per_s, peak_bandwidth)
