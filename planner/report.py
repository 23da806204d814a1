"""A `Plan` as `splitserve plan` prints it: one labelled line per question, numbers only, and
the key of every cited number it rests on in brackets (planner/data.py, docs/planning.md)."""

from __future__ import annotations

from splitserve.planner import data
from splitserve.planner.capacity import Plan


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def _usd(x: float) -> str:
    return f"${x:,.2f}" if x >= 0.1 else f"${x:.3g}"


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:,.2f} GB"


def _cite(*keys: str) -> str:
    return f" [{', '.join(k for k in keys if k)}]"


def format_plan(r: Plan) -> str:
    a, p = r.architecture, r.params
    row = r.kv_bytes_per_token // (2 * a["num_layers"] * a["num_kv_heads"])  # one head's K or V
    kvb = row // a["head_dim"]
    per_head = f"{a['head_dim']} x {kvb} B"
    if row % a["head_dim"]:  # an 8-bit cache: each row also holds its scale
        per_head = f"({per_head} + {row - kvb * a['head_dim']} B scale)"
    nominal = f" ({r.nominal})" if r.nominal else ""
    model_key = f"model.{r.model}" if a["repo"] else ""
    gpu_key = f"gpu.{r.gpu}"
    lines = [
        f"plan: {r.model}{nominal} on {r.gpu_description}, "
        f"{r.batch} x {r.context:,} tokens, weights {r.weight_dtype}, KV {r.kv_dtype}",
        f"model        {a['num_layers']} layers, hidden {a['hidden_size']}, intermediate "
        f"{a['intermediate_size']}, {a['num_heads']} heads / {a['num_kv_heads']} KV heads x "
        f"{a['head_dim']}, vocab {a['vocab_size']}, "
        f"{'tied' if a['tie_word_embeddings'] else 'untied'} embeddings"
        + (_cite(model_key) if model_key else ""),
        f"parameters   {p['total']:,} ({_count(p['total'])}): embeddings {_count(p['embeddings'])}"
        f", attention {_count(p['attention'])}, MLP {_count(p['mlp'])}, norms "
        f"{_count(p['norms'])}, lm_head {_count(p['lm_head']) if p['lm_head'] else 'tied'}",
        f"weights      {_gb(r.weight_bytes)} ({r.weight_dtype}, "
        f"{r.weight_bytes / p['total']:g} B/param)" + _cite(f"dtype.{r.weight_dtype}"),
        f"KV cache     {r.kv_bytes_per_token:,} B/token (2 x {a['num_layers']} layers x "
        f"{a['num_kv_heads']} KV heads x {per_head}); {r.batch} x {r.context:,} "
        f"tokens: {_gb(r.kv_bytes)} ({r.kv_bytes / 2**30:,.2f} GiB)" + _cite(f"dtype.{r.kv_dtype}"),
        f"total        {_gb(r.total_bytes)}",
        f"one GPU      {'fits' if r.fits_one_gpu else 'does not fit'}: {_gb(r.total_bytes)} "
        f"{'<=' if r.fits_one_gpu else '>'} {r.usable_gb_per_gpu:,.2f} GB usable "
        f"({r.gpu_memory_gb:g} GB less {r.headroom:.0%} headroom)" + _cite(gpu_key),
        f"one-GPU rate {r.single_gpu_passes_per_s:,.1f} forward passes/s at most "
        f"(bandwidth / all weight bytes{', if it fit' if not r.fits_one_gpu else ''})"
        + _cite(gpu_key),
    ]
    lines += _layout_lines(r) if r.layout else ["layout       none fits (see notes)"]
    return "\n".join(lines + [f"note         {n}" for n in r.notes])


def _layout_lines(r: Plan) -> list[str]:
    lay = r.layout
    assert lay is not None
    lo, hi = lay.tokens_per_s_realistic
    c_lo, c_hi = lay.usd_per_m_tokens_realistic
    f_lo, f_hi = data.REALISTIC_FRACTION.value
    return [
        f"layout       TP={lay.tp} x PP={lay.pp} = {lay.gpus} GPU{'s' if lay.gpus > 1 else ''}: "
        f"{lay.gb_per_gpu:,.2f} GB per GPU (weights {lay.weight_gb_per_gpu:,.2f} + KV "
        f"{lay.kv_gb_per_gpu:,.2f}) of {lay.usable_gb_per_gpu:,.2f} GB usable"
        + _cite(data.MAX_TP.key),
        f"ceiling      {lay.passes_per_s:,.1f} forward passes/s ({lay.bound} bound: "
        f"weights per GPU / bandwidth per GPU gives {lay.passes_per_s_bandwidth:,.1f}, "
        f"compute {lay.passes_per_s_compute:,.1f})",
        f"             -> {lay.tokens_per_s_ceiling:,.0f} tokens/s decode at batch "
        f"{r.batch}; {lay.passes_per_s_bandwidth_with_kv:,.1f} passes/s = "
        f"{lay.passes_per_s_bandwidth_with_kv * r.batch:,.0f} tokens/s if every step also "
        "reads the full-context KV",
        f"realistic    {lo:,.0f}-{hi:,.0f} tokens/s ({100 * f_lo:.0f}-{100 * f_hi:.0f}% of the "
        "ceiling)" + _cite(data.REALISTIC_FRACTION.key),
        f"cost         {_usd(r.usd_per_gpu_hour)}/GPU-hour{_cite(r.price_source)} x "
        f"{lay.gpus} = {_usd(lay.usd_per_hour)}/hour: {_usd(lay.usd_per_m_tokens_ceiling)}/M "
        f"output tokens at the ceiling, {_usd(c_lo)}-{_usd(c_hi)}/M realistic",
    ]
