"""Capacity planning: will a model fit, on how many GPUs, how fast at best, at what cost.

Pure arithmetic on an architecture (planner/architecture.py) and the cited numbers in
planner/data.py (GPU datasheets, prices, bytes per value, the article's rules of thumb),
following the sizing argument docs/planning.md walks through: weights are parameters x bytes
per parameter, the KV cache is ``2 x layers x kv_heads x head_dim x bytes`` per token, and a
decode step that must stream every weight from HBM can run at most ``bandwidth / weight bytes``
times a second.

Units: GB and TB are decimal (10^9, 10^12 bytes), as GPU datasheets and the article use them.
No torch at import time: only reading a GGUF file or a config.json pulls the engine in.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from splitserve.planner import data
from splitserve.planner.architecture import Architecture, count_params
from splitserve.planner.data import BUILTIN_MODELS, DTYPE_BYTES, GPU, KV_DTYPES, Cited
from splitserve.planner.inputs import get_gpu, parse_count, parse_dtype, resolve_model

GB = 1e9
GIB = 2**30
TB = 1e12

WEIGHT_DTYPE_BYTES = {name: float(c.mid) for name, c in DTYPE_BYTES.items()}
KV_DTYPE_BYTES = {name: int(DTYPE_BYTES[name].mid) for name in KV_DTYPES}
# What splitserve allocates beside the values, so that a plan is what the engine holds:
# 8-bit KV rows carry one bfloat16 scale per token, KV head and K/V (model/kv_quant.py);
# int8 weights one bfloat16 scale per output row; int4 weights a bfloat16 scale and zero per
# group of 32 inputs, with the embedding and LM head kept in int8 (model/quant_linear.py).
KV_ROW_SCALE_BYTES = 2
INT8_ROW_SCALE_BYTES = 2
INT4_GROUP, INT4_GROUP_BYTES = 32, 4
NORM_DTYPE = "fp16"  # under int8/int4 the norms stay in the model's 16-bit dtype
# Tensor parallelism stays inside a node of MAX_TP GPUs; beyond that, pipeline stages.
TP_DEGREES = tuple(2**i for i in range(int(math.log2(data.MAX_TP.mid)) + 1))
KV_READS_NOTE_BELOW = 0.75  # a note when full-context KV reads cut the ceiling below this share


def kv_row_bytes(head_dim: int, kv_dtype: str) -> int:
    """One token's K (or V) of one KV head as the engine stores it: the values, and an 8-bit
    cache's scale."""
    size = KV_DTYPE_BYTES[kv_dtype]
    return head_dim * size + (KV_ROW_SCALE_BYTES if size == 1 else 0)


def kv_bytes_per_token(a: Architecture, kv_dtype: str = "fp16") -> int:
    """K and V of one token: 2 x layers x kv_heads x (head_dim x bytes per element + an
    8-bit cache's scale)."""
    return 2 * a.num_layers * a.num_kv_heads * kv_row_bytes(a.head_dim, kv_dtype)


def bytes_per_param(a: Architecture, weight_dtype: str) -> dict[str, float]:
    """Bytes a parameter takes, by kind ("matrix": the layers' linears, "table": embedding
    and LM head, "norm"), scales included."""
    wb = WEIGHT_DTYPE_BYTES[weight_dtype]
    if weight_dtype not in ("int8", "int4"):
        return {"matrix": wb, "table": wb, "norm": wb}
    int8_table = 1 + INT8_ROW_SCALE_BYTES / a.hidden_size
    norm = WEIGHT_DTYPE_BYTES[NORM_DTYPE]
    if weight_dtype == "int8":
        # a scale per output row: over one row's inputs (hidden or intermediate wide), on average
        matrix = 1 + INT8_ROW_SCALE_BYTES * _rows_per_param(a)
    else:
        matrix = wb + INT4_GROUP_BYTES / INT4_GROUP
    return {"matrix": matrix, "table": int8_table, "norm": norm}


def _rows_per_param(a: Architecture) -> float:
    """Output rows per parameter over one layer's linears (each row has one int8 scale)."""
    q, kv, h, f = (
        a.num_heads * a.head_dim,
        a.num_kv_heads * a.head_dim,
        a.hidden_size,
        a.intermediate_size,
    )
    rows = q + 2 * kv + h + 2 * f + h  # q, k, v, o; gate, up; down
    params = h * q + 2 * h * kv + q * h + 3 * h * f
    return rows / params


def weight_bytes(a: Architecture, weight_dtype: str) -> float:
    """The whole model's weights as the engine holds them: one GPU's share of a 1 x 1 layout."""
    (stage,) = layout_stages(a, 1, 1, weight_dtype, "fp16", 0, 0)
    return stage.weight_bytes_per_gpu


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
    b = bytes_per_param(a, weight_dtype)
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
        split = layers * (p.attention_per_layer + p.mlp_per_layer) * b["matrix"]
        replicated = layers * p.norms_per_layer * b["norm"]
        flops = layers * layer_flops
        if i == 0:
            split += p.embeddings * b["table"]  # a lookup: memory, no FLOPs
        if i == pp - 1:
            replicated += p.final_norm * b["norm"]
            split += (p.lm_head if (p.lm_head or pp == 1) else p.embeddings) * b["table"]
            flops += 2 * p.embeddings  # the lm_head matmul (tied or not: vocab x hidden)
        kv = batch * context * 2 * layers * kv_heads_per_gpu * kv_row_bytes(a.head_dim, kv_dtype)
        stages.append(Stage(layers, split / tp + replicated, float(kv), flops / tp))
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
    price_source: str  # the key of the cited price, or "--gpu-hour-usd"
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
    sources: list[str] = field(default_factory=list)  # the keys of every cited number used

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
    kv_dtype = parse_dtype(kv_dtype, KV_DTYPE_BYTES, "KV dtype")
    weight_dtype = parse_dtype(weight_dtype, WEIGHT_DTYPE_BYTES, "weight dtype")
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom must be a fraction in [0, 1), got {headroom}")
    price = g.usd_per_hour if usd_per_gpu_hour is None else float(usd_per_gpu_hour)
    if not price > 0 or math.isinf(price):
        raise ValueError(f"--gpu-hour-usd must be a positive price, got {usd_per_gpu_hour}")
    arch = model if isinstance(model, Architecture) else resolve_model(model)

    p = count_params(arch)
    weights = weight_bytes(arch, weight_dtype)
    kv_tok = kv_bytes_per_token(arch, kv_dtype)
    kv_bytes = kv_tok * context * batch
    usable = g.memory_gb * (1 - headroom)
    layout = smallest_layout(arch, g, weight_dtype, kv_dtype, context, batch, usable, price)
    result = Plan(
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
        price_source=g.price.key if usd_per_gpu_hour is None else "--gpu-hour-usd",
        architecture=asdict(arch),
        params={
            "total": p.total,
            "embeddings": p.embeddings,
            "lm_head": p.lm_head,
            "attention": p.num_layers * p.attention_per_layer,
            "mlp": p.num_layers * p.mlp_per_layer,
            "norms": p.num_layers * p.norms_per_layer + p.final_norm,
        },
        weight_bytes=weights,
        kv_bytes_per_token=kv_tok,
        kv_bytes=float(kv_bytes),
        total_bytes=weights + kv_bytes,
        gpu_memory_gb=g.memory_gb,
        usable_gb_per_gpu=usable,
        fits_one_gpu=weights + kv_bytes <= usable * GB,
        single_gpu_passes_per_s=g.bandwidth_tbs * TB / weights,
        layout=layout,
    )
    result.notes = plan_notes(result, arch, g)
    result.sources = sorted(
        {g.key, f"dtype.{weight_dtype}", f"dtype.{kv_dtype}", data.MAX_TP.key}
        | ({result.price_source} - {"--gpu-hour-usd"})
        | ({arch.key} - {""})
        | ({data.REALISTIC_FRACTION.key} if layout else set())
        | {key for note in result.notes for key in _keys(note)}
    )
    return result


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
    lo, hi = data.REALISTIC_FRACTION.value
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


def plan_notes(r: Plan, a: Architecture, g: GPU) -> list[str]:
    """What the headline numbers leave out, and how they compare with the article's figures.
    Each cited number is printed with its key, in brackets at the end."""
    notes = []
    if a.max_position_embeddings and r.context > a.max_position_embeddings:
        notes.append(
            f"context {r.context} is beyond the model's {a.max_position_embeddings} positions"
        )
    lay = r.layout
    if lay is None:
        notes.append(
            f"does not fit even on TP={max(valid_tp_degrees(a))} x PP={a.num_layers}: "
            "shrink the batch or context, or quantize"
        )
    elif lay.passes_per_s_bandwidth_with_kv < KV_READS_NOTE_BELOW * lay.passes_per_s_bandwidth:
        kv_tokens = lay.passes_per_s_bandwidth_with_kv * r.batch
        notes.append(
            f"at {r.batch} x {r.context:,} tokens the KV reads rival the weights: a full-context "
            f"step is bounded at {kv_tokens:,.0f} tokens/s "
            f"(${usd_m(lay.usd_per_hour, kv_tokens):.3g}/M at that rate), well under the "
            "weights-only ceiling"
        )
    if lay is not None and lay.tp > 1 and not g.fast_interconnect:
        notes.append(
            f"TP={lay.tp} over {g.interconnect}: the ceiling leaves out an AllReduce per layer; "
            f"cited {data.TP_OVER_PCIE} over PCIe [{data.TP_OVER_PCIE.key}]"
        )
    notes += _quantization_notes(r)
    return notes + _article_checks(r, a, g)


def _quantization_notes(r: Plan) -> list[str]:
    notes = []
    if r.weight_dtype == "int4":
        fp16_total = r.params["total"] * WEIGHT_DTYPE_BYTES["fp16"] + r.kv_bytes
        less = 1 - r.total_bytes / fp16_total
        notes.append(
            f"int4 weights at {WEIGHT_DTYPE_BYTES['int4'] + INT4_GROUP_BYTES / INT4_GROUP:g} "
            f"B/param in the layers (a 16-bit scale and zero per {INT4_GROUP} inputs; embedding "
            f"and lm_head in int8): weights + KV {r.total_bytes / GB:,.2f} GB, {less:.0%} less "
            f"than with fp16 weights; cited {data.AWQ_INT4_SAVING} "
            f"[{DTYPE_BYTES['int4'].key}, {data.AWQ_INT4_SAVING.key}]"
        )
    if KV_DTYPE_BYTES[r.kv_dtype] == 1:
        hd = r.architecture["head_dim"]
        fp16_kv = r.kv_bytes * kv_row_bytes(hd, "fp16") / kv_row_bytes(hd, r.kv_dtype)
        notes.append(
            f"KV in {r.kv_dtype}: {r.kv_bytes / GB:,.2f} GB, {fp16_kv / r.kv_bytes:.2f}x as many "
            f"sequences per GB as fp16 ({fp16_kv / GB:,.2f} GB); cited {data.KV_8BIT_SEQUENCES} "
            f"[{data.KV_8BIT_SEQUENCES.key}]"
        )
    return notes


def _article_checks(r: Plan, a: Architecture, g: GPU) -> list[str]:
    """Where this plan recomputes one of the article's figures: both numbers, side by side."""

    def check(what: str, computed: str, cited: Cited) -> str:
        return f"{what}: {computed} computed, {cited} cited [{cited.key}]"

    fp16 = ("fp16", "bf16")
    notes = []
    if a.same_shape(BUILTIN_MODELS["llama-3-70b"]):
        if r.weight_dtype in fp16:
            weights = f"{r.weight_bytes / GB:,.2f} GB"
            notes.append(check("70B weights", weights, data.WEIGHTS_70B_FP16))
            if g.name == "h100":
                rate = f"{r.single_gpu_passes_per_s:.1f} forward passes/s"
                notes.append(check("one-H100 rate", rate, data.CEILING_70B_H100))
        if r.kv_dtype in fp16 and (r.context, r.batch) == (4096, 32):
            kv = f"{r.kv_bytes / GB:.2f} GB ({r.kv_bytes / GIB:.2f} GiB)"
            notes.append(check("KV cache at 4K x 32", kv, data.KV_70B_4K_32))
    if a.same_shape(BUILTIN_MODELS["llama-3-405b"]) and r.weight_dtype in fp16:
        weights = f"{r.weight_bytes / GB:,.2f} GB"
        notes.append(check("405B weights", weights, data.WEIGHTS_405B_FP16))
    return notes


def _keys(note: str) -> list[str]:
    """The keys a note cites: the bracketed list at its end."""
    if not note.endswith("]"):
        return []
    return note[note.rindex("[") + 1 : -1].split(", ")
