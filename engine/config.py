"""Configuration: the model's architecture and the engine's runtime knobs.

`ModelConfig` is built from a Hugging Face ``config.json`` dict (GGUF metadata is translated to
the same dict by the loader), so every architecture variant is one code path.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
PIPELINE_SCHEDULES = ("overlap", "step")
QUANTIZATIONS = ("auto", "none", "int8", "int4")
# "auto": the model's dtype; else values at 8 bits with a scale per token and KV head
# (model/kv_quant.py)
KV_CACHE_DTYPES = ("auto", "int8", "fp8_e4m3")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
    key = aliases.get(name, name)
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[key]


def kv_cache_key(dtype: str, kv_cache_dtype: str = "auto", quantization: str = "none") -> str:
    """What the KV bytes depend on besides the model, for prefix-hash namespaces: the model
    dtype, and the KV cache's own when it has one. Workers and the router must agree.
    Weights quantized at load compute other KV, so they get a namespace of their own."""
    key = dtype if kv_cache_dtype == "auto" else f"{dtype}/kv-{kv_cache_dtype}"
    return key if quantization in ("none", "auto") else f"{key}/w-{quantization}"


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling (``rope_type == "llama3"``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A model's architecture. Keyword-only: a dozen ints in a row are too easy to misorder."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 has biases on q/k/v
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = "model"

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], name: str = "model") -> ModelConfig:
        arch = cfg.get("model_type", "llama")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported model_type {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
        rope_theta = float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = None
        if rope_type == "llama3":
            scaling = RopeScaling(
                factor=float(rope["factor"]),
                low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
            )
        elif rope_type not in ("default", None):
            raise ValueError(f"unsupported rope scaling type {rope_type!r}")
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(cfg.get("head_dim") or hidden // num_heads),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            name=name,
        )

    def to_hf(self) -> dict[str, Any]:
        """The inverse of `from_hf`, enough for transformers to build the same model."""
        cfg: dict[str, Any] = {
            "model_type": self.architecture,
            "architectures": [
                {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}.get(
                    self.architecture, "Qwen2ForCausalLM"
                )
            ],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "hidden_act": "silu",
        }
        if self.rope_scaling is not None:
            cfg["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        if self.bos_token_id is not None:
            cfg["bos_token_id"] = self.bos_token_id
        if self.eos_token_ids:
            cfg["eos_token_id"] = list(self.eos_token_ids)
        return cfg

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V one token occupies across all layers, at 1 byte per element."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim


@dataclass(frozen=True)
class EngineConfig:
    """Runtime knobs. Defaults suit a CPU with a few GiB to spare."""

    model: str | None = None  # path to a GGUF file or HF folder; None = the default model
    dtype: str = "float32"
    device: str = "cpu"
    block_size: int = 16
    kv_cache_memory_bytes: int = 512 * 1024 * 1024
    kv_cache_dtype: str = "auto"  # "auto" (the model dtype), "int8" or "fp8_e4m3"
    num_kv_blocks: int | None = None  # overrides the memory budget when set (tests, benches)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512  # per-step token budget; prefills are chunked to fit
    max_model_len: int | None = None  # defaults to the model's max_position_embeddings
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"  # "torch", "cpp" (CPU kernel), or "auto"
    # "torch", "onednn", "blocks" (GGUF blocks kept), "blocks-int8" (and int8 activations),
    # or "auto"
    linear_backend: str = "auto"
    # weight-only quantization at load (model/quant_linear.py): "none", "int8" (per output
    # channel), "int4" (groups of `quantization_group_size` inputs), or "auto": the
    # checkpoint's own (int4 for an AWQ/GPTQ folder), else none
    quantization: str = "auto"
    quantization_group_size: int = 32
    num_threads: int | None = None
    seed: int = 0
    tensor_parallel_size: int = 1  # ranks in this worker's torch.distributed group
    # a rank that doesn't finish a collective or KV move by then fails the group; None:
    # $SPLITSERVE_TP_TIMEOUT_S, else 60 s
    tensor_parallel_timeout_s: float | None = None
    pipeline_stages: int = 1  # processes the layers are split across
    pipeline_layers: tuple[int, ...] | None = None  # layers per stage; None = balanced
    micro_batches: int = 1  # a step is cut into this many micro-batches under PP
    # "overlap": `micro_batches` groups of sequences, each a micro-batch, step on their own
    # (no bubble between steps); "step": every step cut into micro-batches, then sampled at once
    pipeline_schedule: str = "overlap"
    # host:port of stages 1..P-1 started elsewhere (compose); None = start them as children
    pipeline_stage_addresses: tuple[str, ...] | None = None
    pipeline_timeout_s: float = 60.0  # a stage that doesn't answer a micro-batch by then is dead
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def weights_key(self) -> str:
        """The weight quantization as it changes the numbers: none, int8 or int4g<group>."""
        if self.quantization == "int4":
            return f"int4g{self.quantization_group_size}"
        return self.quantization

    def __post_init__(self) -> None:
        parse_dtype(self.dtype)
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"--kv-cache-dtype {self.kv_cache_dtype!r}: choose one of "
                f"{', '.join(KV_CACHE_DTYPES)}"
            )
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"--quantization {self.quantization!r}: choose one of {', '.join(QUANTIZATIONS)}"
            )
        if self.quantization_group_size not in (32, 64, 128, 256):
            raise ValueError(
                "quantization_group_size must be 32, 64, 128 or 256 (what the int4 kernel "
                f"takes); got {self.quantization_group_size}"
            )
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError("block_size must be a positive power of two")
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        if self.tensor_parallel_size < 1 or self.pipeline_stages < 1 or self.micro_batches < 1:
            raise ValueError("tensor_parallel_size, pipeline_stages and micro_batches must be >= 1")
        if self.pipeline_schedule not in PIPELINE_SCHEDULES:
            raise ValueError(
                f"pipeline_schedule must be one of {', '.join(PIPELINE_SCHEDULES)}; "
                f"got {self.pipeline_schedule!r}"
            )
        for name in ("tensor_parallel_timeout_s", "pipeline_timeout_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds; got {value}")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be cpu, cuda or cuda:N; got {self.device!r}")


class ModelLoadError(ValueError):
    """A checkpoint that cannot be used, with a one-line reason fit to show a user."""

    def __init__(self, message: str) -> None:
        # Reader errors can span lines; callers print this on one.
        super().__init__(" ".join(str(message).split()))
