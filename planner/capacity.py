"""Capacity planning: will a model fit, on how many GPUs, how fast at best, at what cost.

Pure arithmetic on an architecture (layers, heads, widths, vocabulary) and a GPU's datasheet
numbers, following the sizing argument of "Distributed LLM Inference: Scaling Beyond One GPU"
(docs/planning.md walks through it): weights are parameters x bytes per parameter, the KV cache
is ``2 x layers x kv_heads x head_dim x bytes`` per token, and a decode step that must stream
every weight from HBM can run at most ``bandwidth / weight bytes`` times a second.

Units: GB and TB are decimal (10^9, 10^12 bytes), as GPU datasheets and the article use them.
No torch at import time: only reading a GGUF file or a config.json pulls the engine in.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

GB = 1e9
GIB = 2**30
TB = 1e12

WEIGHT_DTYPE_BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}
KV_DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1}

# "Real-world single-GPU throughput on large models lands 60-70 % below that ceiling" (the
# article), i.e. 30-40 % of it.
REALISTIC_FRACTION = (0.30, 0.40)

MAX_TP = 8  # GPUs in one node: tensor parallelism stays inside it; beyond that, pipeline stages
TP_DEGREES = (1, 2, 4, 8)


@dataclass(frozen=True)
class Architecture:
    """The numbers of a decoder-only Llama-family model that decide its size."""

    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # Qwen2: biases on q, k and v
    max_position_embeddings: int | None = None
    nominal: str = ""  # the size the model is known by, for the report

    @classmethod
    def from_model_config(cls, cfg: Any, name: str | None = None) -> Architecture:
        """From an `engine.config.ModelConfig` (read by attribute, so no import of it here)."""
        return cls(
            name=name or cfg.name,
            num_layers=cfg.num_layers,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            vocab_size=cfg.vocab_size,
            tie_word_embeddings=cfg.tie_word_embeddings,
            attention_bias=cfg.attention_bias,
            max_position_embeddings=cfg.max_position_embeddings,
        )

    def same_shape(self, other: Architecture) -> bool:
        keys = ("name", "nominal", "max_position_embeddings")
        mine = {k: v for k, v in asdict(self).items() if k not in keys}
        return mine == {k: v for k, v in asdict(other).items() if k not in keys}


# From each model's public config.json on the Hugging Face Hub.
BUILTIN_MODELS: dict[str, Architecture] = {
    a.name: a
    for a in (
        # meta-llama/Meta-Llama-3-8B
        Architecture("llama-3-8b", 32, 4096, 14336, 32, 8, 128, 128256, False, False, 8192, "8B"),
        # meta-llama/Meta-Llama-3-70B
        Architecture("llama-3-70b", 80, 8192, 28672, 64, 8, 128, 128256, False, False, 8192, "70B"),
        # meta-llama/Llama-3.1-405B (the only 405B; 128K context)
        Architecture(
            "llama-3-405b", 126, 16384, 53248, 128, 8, 128, 128256, False, False, 131072, "405B"
        ),
        # meta-llama/Llama-2-70b-hf
        Architecture("llama-2-70b", 80, 8192, 28672, 64, 8, 128, 32000, False, False, 4096, "70B"),
        # meta-llama/Llama-2-7b-hf (no GQA: 32 KV heads)
        Architecture("llama-2-7b", 32, 4096, 11008, 32, 32, 128, 32000, False, False, 4096, "7B"),
        # mistralai/Mistral-7B-v0.1
        Architecture("mistral-7b", 32, 4096, 14336, 32, 8, 128, 32000, False, False, 32768, "7B"),
        # Qwen/Qwen2-72B
        Architecture("qwen2-72b", 80, 8192, 29568, 64, 8, 128, 152064, False, True, 32768, "72B"),
        # HuggingFaceTB/SmolLM2-135M(-Instruct): the default model
        Architecture("smollm2-135m", 30, 576, 1536, 9, 3, 64, 49152, True, False, 8192, "135M"),
    )
}


@dataclass(frozen=True)
class GPU:
    name: str
    description: str
    memory_gb: float  # HBM/GDDR capacity, decimal GB as marketed
    bandwidth_tbs: float  # memory bandwidth, TB/s
    bf16_tflops: float  # dense (no sparsity) bf16 tensor-core peak
    interconnect: str  # GPU-to-GPU link inside a node
    fast_interconnect: bool  # NVLink-class (TP-friendly) rather than PCIe only
    usd_per_hour: float  # typical cloud price per GPU-hour
    price_source: str


# Memory, bandwidth and dense bf16 TFLOP/s: NVIDIA / AMD datasheets (the article quotes the
# H100's 3.35 TB/s and the memory sizes). Prices: the article where it gives one, else assumed.
GPUS: dict[str, GPU] = {
    g.name: g
    for g in (
        GPU(
            "h100", "NVIDIA H100 SXM5 80 GB", 80, 3.35, 989, "NVLink 4 (900 GB/s)", True, 9.00,
            "article: $8-10 on-demand, midpoint",
        ),
        GPU(
            "h200", "NVIDIA H200 SXM 141 GB", 141, 4.8, 989, "NVLink 4 (900 GB/s)", True, 10.00,
            "assumption: a little above the H100 (not in the article)",
        ),
        GPU(
            "a100-80g", "NVIDIA A100 SXM 80 GB", 80, 2.039, 312, "NVLink 3 (600 GB/s)", True, 3.50,
            "article: $3-4 on-demand, midpoint; $2-3 spot",
        ),
        GPU(
            "a100-40g", "NVIDIA A100 SXM 40 GB", 40, 1.555, 312, "NVLink 3 (600 GB/s)", True, 3.00,
            "assumption: a little below the A100 80 GB (not in the article)",
        ),
        GPU(
            "l4", "NVIDIA L4 24 GB", 24, 0.300, 121, "PCIe 4 only", False, 0.80,
            "article: ~$0.80 spot",
        ),
        GPU(
            "l40s", "NVIDIA L40S 48 GB", 48, 0.864, 362, "PCIe 4 only", False, 1.60,
            "assumption: the article gives no L40S price",
        ),
        GPU(
            "mi300x", "AMD Instinct MI300X 192 GB", 192, 5.3, 1307, "Infinity Fabric (896 GB/s)",
            True, 9.00, "assumption: 'competitive with H100' (article), so the H100 midpoint",
        ),
    )
}  # fmt: skip


# --- inputs -----------------------------------------------------------------------------------


def parse_count(value: str | int, what: str) -> int:
    """A positive integer, also written with a K suffix (``4k`` = 4096)."""
    if isinstance(value, int):
        n = value
    else:
        text = str(value).strip().lower().replace("_", "")
        scale = 1024 if text.endswith("k") else 1
        try:
            n = int(text[:-1] if scale > 1 else text) * scale
        except ValueError:
            raise ValueError(f"{what} must be a positive integer, got {value!r}") from None
    if n < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return n


def get_gpu(name: str) -> GPU:
    gpu = GPUS.get(name.strip().lower())
    if gpu is None:
        raise ValueError(f"unknown GPU {name!r}; choose one of {', '.join(GPUS)}")
    return gpu


def _dtype(name: str, table: dict[str, float], what: str) -> str:
    key = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32"}.get(
        name.strip().lower(), name.strip().lower()
    )
    if key not in table:
        raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(table)}")
    return key


def resolve_model(spec: str) -> Architecture:
    """A built-in name, a config.json file, a Hugging Face folder or a GGUF file."""
    key = spec.strip().lower()
    if key in BUILTIN_MODELS:
        return BUILTIN_MODELS[key]
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        config_json = os.path.join(path, "config.json")
        if not os.path.isfile(config_json):
            raise ValueError(f"{path} is a folder without config.json, not a model folder")
        # The config alone: planning needs no weights (and they may not be downloaded yet).
        name = os.path.basename(os.path.normpath(path))
        return _from_hf_dict(_read_json(config_json), name, config_json)
    if os.path.isfile(path):
        with open(path, "rb") as f:
            head = f.read(4)
        if head == b"GGUF":
            from splitserve.model.loader import open_checkpoint  # torch, only now

            # Reads the metadata only; `.tensors()` (the weights) is never called.
            return Architecture.from_model_config(open_checkpoint(path).config)
        name = os.path.basename(os.path.dirname(os.path.abspath(path))) or "model"
        return _from_hf_dict(_read_json(path), name, path)
    if os.sep in spec or spec.endswith((".json", ".gguf")) or spec.startswith("~"):
        raise ValueError(f"no such model file or folder: {path}")
    raise ValueError(
        f"unknown model {spec!r}; built-in names: {', '.join(BUILTIN_MODELS)}; "
        "or pass a config.json, a GGUF file or a Hugging Face folder"
    )


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable config.json ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _from_hf_dict(cfg: dict[str, Any], name: str, path: str) -> Architecture:
    from splitserve.engine.config import ModelConfig  # torch, only now

    try:
        model_config = ModelConfig.from_hf(cfg, name=name)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: unsupported or incomplete config ({e!s})") from e
    return Architecture.from_model_config(model_config)


# --- the arithmetic ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamCount:
    """Parameters by where they live; `layer` is one transformer block."""

    embeddings: int  # vocab x hidden
    lm_head: int  # vocab x hidden, 0 when tied to the embeddings
    attention_per_layer: int  # q, k, v, o (+ q/k/v biases)
    mlp_per_layer: int  # gate, up, down
    norms_per_layer: int  # two RMSNorm weights
    final_norm: int
    num_layers: int

    @property
    def per_layer(self) -> int:
        return self.attention_per_layer + self.mlp_per_layer + self.norms_per_layer

    @property
    def total(self) -> int:
        return self.embeddings + self.lm_head + self.num_layers * self.per_layer + self.final_norm


def count_params(a: Architecture) -> ParamCount:
    q_width = a.num_heads * a.head_dim
    kv_width = a.num_kv_heads * a.head_dim
    attention = a.hidden_size * q_width + 2 * a.hidden_size * kv_width + q_width * a.hidden_size
    if a.attention_bias:
        attention += q_width + 2 * kv_width
    embeddings = a.vocab_size * a.hidden_size
    return ParamCount(
        embeddings=embeddings,
        lm_head=0 if a.tie_word_embeddings else embeddings,
        attention_per_layer=attention,
        mlp_per_layer=3 * a.hidden_size * a.intermediate_size,
        norms_per_layer=2 * a.hidden_size,
        final_norm=a.hidden_size,
        num_layers=a.num_layers,
    )


def kv_bytes_per_token(a: Architecture, kv_dtype: str = "fp16") -> int:
    """K and V of one token: 2 x layers x kv_heads x head_dim x bytes per element."""
    return 2 * a.num_layers * a.num_kv_heads * a.head_dim * KV_DTYPE_BYTES[kv_dtype]


def valid_tp_degrees(a: Architecture) -> list[int]:
    """Powers of two up to 8 that split the query heads and either split the KV heads evenly
    or are a multiple of them (each KV head is then replicated on tp / kv_heads GPUs)."""
    return [
        tp
        for tp in TP_DEGREES
        if a.num_heads % tp == 0 and (a.num_kv_heads % tp == 0 or tp % a.num_kv_heads == 0)
    ]


@dataclass(frozen=True)
class Stage:
    """One pipeline stage as one of its TP GPUs sees it."""

    layers: int
    weight_bytes_per_gpu: float
    kv_bytes_per_gpu: float  # the whole batch at full context
    flops_per_token_per_gpu: float  # at full context

    @property
    def bytes_per_gpu(self) -> float:
        return self.weight_bytes_per_gpu + self.kv_bytes_per_gpu


def layout_stages(
    a: Architecture, tp: int, pp: int, weight_dtype: str, kv_dtype: str, context: int, batch: int
) -> list[Stage]:
    """Per-GPU memory and work of each stage of a TP x PP layout, `batch` x `context` tokens.

    Matrices (and the vocabulary-parallel embedding / lm_head) are split `tp` ways; norm
    weights are replicated. Layers are spread as evenly as possible over the `pp` stages; the
    first holds the embeddings, the last the final norm and the lm_head (with tied embeddings
    and pp > 1 the last stage keeps its own copy of the embedding matrix).
    """
    p = count_params(a)
    wb = WEIGHT_DTYPE_BYTES[weight_dtype]
    kv_heads_per_gpu = a.num_kv_heads // tp if tp <= a.num_kv_heads else 1
    # Per token per layer: 2 FLOPs per weight of q, k, v, o and the MLP, plus QK^T and AV
    # over the whole context (2 x 2 x heads x head_dim x context).
    layer_flops = 2 * (p.attention_per_layer + p.mlp_per_layer) + 4 * context * (
        a.num_heads * a.head_dim
    )
    base, extra = divmod(a.num_layers, pp)
    stages = []
    for i in range(pp):
        layers = base + (1 if i < extra else 0)
        split = layers * (p.attention_per_layer + p.mlp_per_layer)
        replicated = layers * p.norms_per_layer
        flops = layers * layer_flops
        if i == 0:
            split += p.embeddings  # a lookup: memory, no FLOPs
        if i == pp - 1:
            replicated += p.final_norm
            split += p.lm_head if (p.lm_head or pp == 1) else p.embeddings
            flops += 2 * p.embeddings  # the lm_head matmul (tied or not: vocab x hidden)
        kv = batch * context * 2 * layers * kv_heads_per_gpu * a.head_dim
        stages.append(
            Stage(
                layers,
                (split / tp + replicated) * wb,
                float(kv * KV_DTYPE_BYTES[kv_dtype]),
                flops / tp,
            )
        )
    return stages


@dataclass
class Layout:
    tp: int
    pp: int
    gpus: int
    weight_gb_per_gpu: float  # the fullest stage
    kv_gb_per_gpu: float
    gb_per_gpu: float
    usable_gb_per_gpu: float
    passes_per_s_bandwidth: float  # weights only (the article's model)
    passes_per_s_bandwidth_with_kv: float  # weights + every sequence's KV at full context
    passes_per_s_compute: float
    passes_per_s: float  # min(bandwidth, compute)
    bound: str  # "memory bandwidth" or "compute"
    tokens_per_s_ceiling: float
    tokens_per_s_realistic: tuple[float, float]
    usd_per_hour: float
    usd_per_m_tokens_ceiling: float
    usd_per_m_tokens_realistic: tuple[float, float]


@dataclass
class Plan:
    model: str
    nominal: str
    gpu: str
    gpu_description: str
    context: int
    batch: int
    weight_dtype: str
    kv_dtype: str
    headroom: float
    usd_per_gpu_hour: float
    price_source: str
    architecture: dict[str, Any]
    params: dict[str, int]
    weight_bytes: float
    kv_bytes_per_token: int
    kv_bytes: float
    total_bytes: float
    gpu_memory_gb: float
    usable_gb_per_gpu: float
    fits_one_gpu: bool
    single_gpu_passes_per_s: float  # bandwidth / all weight bytes: the article's "about 23"
    layout: Layout | None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan(
    model: str | Architecture,
    gpu: str,
    context: int | str,
    batch: int | str,
    kv_dtype: str = "fp16",
    weight_dtype: str = "fp16",
    usd_per_gpu_hour: float | None = None,
    headroom: float = 0.1,
) -> Plan:
    """Size `model` for `batch` sequences of `context` tokens on `gpu`s. Bad input: ValueError."""
    g = get_gpu(gpu)
    context = parse_count(context, "context")
    batch = parse_count(batch, "batch")
    kv_dtype = _dtype(kv_dtype, KV_DTYPE_BYTES, "KV dtype")
    weight_dtype = _dtype(weight_dtype, WEIGHT_DTYPE_BYTES, "weight dtype")
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom must be a fraction in [0, 1), got {headroom}")
    price = g.usd_per_hour if usd_per_gpu_hour is None else float(usd_per_gpu_hour)
    if not price > 0 or math.isinf(price):
        raise ValueError(f"--gpu-hour-usd must be a positive price, got {usd_per_gpu_hour}")
    arch = model if isinstance(model, Architecture) else resolve_model(model)

    p = count_params(arch)
    weight_bytes = p.total * WEIGHT_DTYPE_BYTES[weight_dtype]
    kv_tok = kv_bytes_per_token(arch, kv_dtype)
    tokens = context * batch
    kv_bytes = kv_tok * tokens
    total = weight_bytes + kv_bytes
    usable = g.memory_gb * (1 - headroom)
    layout = smallest_layout(arch, g, weight_dtype, kv_dtype, context, batch, usable, price)

    notes = []
    if arch.max_position_embeddings and context > arch.max_position_embeddings:
        notes.append(
            f"context {context} is beyond the model's {arch.max_position_embeddings} positions"
        )
    if layout is None:
        notes.append(
            f"does not fit even on TP={max(valid_tp_degrees(arch))} x PP={arch.num_layers}: "
            "shrink the batch or context, or quantize"
        )
    elif layout.passes_per_s_bandwidth_with_kv < 0.75 * layout.passes_per_s_bandwidth:
        kv_tokens = layout.passes_per_s_bandwidth_with_kv * batch
        notes.append(
            f"at {batch} x {context:,} tokens the KV reads rival the weights: a full-context step "
            f"is bounded at {kv_tokens:,.0f} tokens/s "
            f"(${usd_m(layout.usd_per_hour, kv_tokens):.3g}/M at that rate), well under the "
            "weights-only ceiling"
        )
    if layout is not None and layout.tp > 1 and not g.fast_interconnect:
        notes.append(
            f"{g.name} has no NVLink-class link ({g.interconnect}): TP={layout.tp} over PCIe "
            "pays an AllReduce per layer that can halve throughput (the article: 1,800 -> 900 "
            "tokens/s for TP=4 A100); the ceiling above ignores it"
        )
    if weight_dtype == "int4":
        notes.append(
            "int4 counts 0.5 B/param; real AWQ/GPTQ files add group scales and often keep the "
            "embeddings and lm_head in fp16, a few % more"
        )
    notes.extend(_article_notes(arch, g, weight_dtype, kv_dtype, context, batch, kv_bytes))
    return Plan(
        model=arch.name,
        nominal=arch.nominal,
        gpu=g.name,
        gpu_description=g.description,
        context=context,
        batch=batch,
        weight_dtype=weight_dtype,
        kv_dtype=kv_dtype,
        headroom=headroom,
        usd_per_gpu_hour=price,
        price_source=g.price_source if usd_per_gpu_hour is None else "--gpu-hour-usd",
        architecture=asdict(arch),
        params={
            "total": p.total,
            "embeddings": p.embeddings,
            "lm_head": p.lm_head,
            "attention": p.num_layers * p.attention_per_layer,
            "mlp": p.num_layers * p.mlp_per_layer,
            "norms": p.num_layers * p.norms_per_layer + p.final_norm,
        },
        weight_bytes=weight_bytes,
        kv_bytes_per_token=kv_tok,
        kv_bytes=float(kv_bytes),
        total_bytes=total,
        gpu_memory_gb=g.memory_gb,
        usable_gb_per_gpu=usable,
        fits_one_gpu=total <= usable * GB,
        single_gpu_passes_per_s=g.bandwidth_tbs * TB / weight_bytes,
        layout=layout,
        notes=notes,
    )


def smallest_layout(
    a: Architecture,
    g: GPU,
    weight_dtype: str,
    kv_dtype: str,
    context: int,
    batch: int,
    usable_gb: float,
    usd_per_gpu_hour: float,
) -> Layout | None:
    """The fewest GPUs that hold the weights and the batch's KV: TP=1, 2, 4, 8 inside a node,
    then pipeline stages of the widest valid TP across nodes (PP=2, 3, ... up to one layer
    per stage). None when even that is not enough."""
    tps = valid_tp_degrees(a)
    candidates = [(tp, 1) for tp in tps] + [(tps[-1], pp) for pp in range(2, a.num_layers + 1)]
    for tp, pp in candidates:
        stages = layout_stages(a, tp, pp, weight_dtype, kv_dtype, context, batch)
        if max(s.bytes_per_gpu for s in stages) <= usable_gb * GB:
            return _rate_layout(a, g, tp, pp, stages, context, batch, usable_gb, usd_per_gpu_hour)
    return None


def _rate_layout(
    a: Architecture,
    g: GPU,
    tp: int,
    pp: int,
    stages: list[Stage],
    context: int,
    batch: int,
    usable_gb: float,
    usd_per_gpu_hour: float,
) -> Layout:
    """Ceilings on decode steps (one forward pass of all `batch` sequences) per second.

    A GPU's stage time is bytes read / bandwidth (memory bound) or FLOPs / peak (compute bound).
    Weights: every GPU streams its share once per pass, so with TP a GPU reads 1/TP of them.
    Pipeline: the batch goes through as m = min(batch, PP) micro-batches; each re-reads its
    stage's weights, while KV reads and FLOPs are per sequence and split m ways. A step ends when
    every micro-batch has crossed every stage, and decode is autoregressive (a micro-batch's next
    token needs its previous one), so ``step = max(sum of stage times, m x slowest stage)``:
    with balanced stages PP adds memory, and for weight reads no bandwidth.
    """
    bw = g.bandwidth_tbs * TB
    peak = g.bf16_tflops * TB
    m = min(batch, pp)

    def step(stage_time) -> float:
        times = [stage_time(s) for s in stages]
        return max(sum(times), m * max(times))

    step_weights = step(lambda s: s.weight_bytes_per_gpu / bw)
    step_with_kv = step(lambda s: (s.weight_bytes_per_gpu + s.kv_bytes_per_gpu / m) / bw)
    step_compute = step(lambda s: (batch / m) * s.flops_per_token_per_gpu / peak)
    bw_passes, compute_passes = 1 / step_weights, 1 / step_compute
    passes = min(bw_passes, compute_passes)
    tokens = passes * batch
    gpus = tp * pp
    usd_hour = gpus * usd_per_gpu_hour
    lo, hi = REALISTIC_FRACTION
    fullest = max(stages, key=lambda s: s.bytes_per_gpu)
    return Layout(
        tp=tp,
        pp=pp,
        gpus=gpus,
        weight_gb_per_gpu=fullest.weight_bytes_per_gpu / GB,
        kv_gb_per_gpu=fullest.kv_bytes_per_gpu / GB,
        gb_per_gpu=fullest.bytes_per_gpu / GB,
        usable_gb_per_gpu=usable_gb,
        passes_per_s_bandwidth=bw_passes,
        passes_per_s_bandwidth_with_kv=1 / step_with_kv,
        passes_per_s_compute=compute_passes,
        passes_per_s=passes,
        bound="memory bandwidth" if bw_passes <= compute_passes else "compute",
        tokens_per_s_ceiling=tokens,
        tokens_per_s_realistic=(tokens * lo, tokens * hi),
        usd_per_hour=usd_hour,
        usd_per_m_tokens_ceiling=usd_m(usd_hour, tokens),
        usd_per_m_tokens_realistic=(usd_m(usd_hour, tokens * hi), usd_m(usd_hour, tokens * lo)),
    )


def usd_m(usd_per_hour: float, tokens_per_s: float) -> float:
    """Dollars per million tokens at a steady `tokens_per_s`."""
    return usd_per_hour / (tokens_per_s * 3600) * 1e6


def _article_notes(
    a: Architecture,
    g: GPU,
    weight_dtype: str,
    kv_dtype: str,
    context: int,
    batch: int,
    kv_bytes: float,
) -> list[str]:
    """Where this plan recomputes one of the article's Llama-3-70B figures, say how it compares."""
    if not a.same_shape(BUILTIN_MODELS["llama-3-70b"]):
        return []
    notes = []
    if weight_dtype in ("fp16", "bf16") and g.name == "h100":
        notes.append(
            "article: 'about 23 forward passes per second' for ~140 GB on 3.35 TB/s; "
            "70e9 x 2 B = 140 GB gives 23.9 and the exact 70.55e9 params 23.7: "
            "both are 23-and-a-bit, the article rounds down"
        )
    if kv_dtype in ("fp16", "bf16") and context == 4096 and batch == 32:
        notes.append(
            f"article: KV '30-40 GB' at 4K x 32; the arithmetic gives {kv_bytes / GB:.2f} GB "
            f"= {kv_bytes / GIB:.2f} GiB: the top of the range only if its GB are GiB, "
            "7% above it in decimal GB"
        )
    return notes
