"""`splitserve bench quant`: what each low-precision option costs in quality, vs full precision.

The reference is the full-precision model: the float32 dequantization of the checkpoint (for
the default SmolLM2 Q4_1 GGUF, exactly the values transformers loads), `--quantization none`
and a float32 KV cache. Every option is one engine-config override (`Option`), so weight
quantization (`{"quantization": "int8"}`), another checkpoint of the same model (AWQ, GPTQ or
another GGUF type, `model=`) and a low-precision KV cache (`{"kv_cache_dtype": "int8"}`) are
rows of one table, measured the same way on the same text (`blocks-int8` is the checkpoint's own
blocks multiplied with int8 activations, `--linear-backend blocks-int8`):

- perplexity of the text, teacher-forced in chunks of `--chunk` tokens (and its change vs the
  reference),
- mean |delta logprob| of the chosen tokens: each option scores the reference's own greedy
  continuations (teacher-forced), against the reference's logprobs of the same tokens,
- greedy agreement: the share of the reference's greedy tokens that the option reproduces
  before its first different token (over `--prompts` prompts of `--new-tokens` tokens), and
  how many of the continuations are identical.

The text is real English that ships with the OS: Debian's /usr/share/common-licenses/GPL-3
(package base-files, Essential, so every Debian/Ubuntu machine and the python:3.11-slim image
has it); `--text` takes another file. Prompts are `--prompt-tokens` tokens starting at evenly
spaced points of the text's second half (the first half is the perplexity text).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

from splitserve.bench.report import final_line, finish, format_table

DEFAULT_TEXT = "/usr/share/common-licenses/GPL-3"
FINAL_KEY = "quant_int8_ppl_change"


@dataclass
class Option:
    """One row: a name, engine-config overrides, and optionally another checkpoint."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    model: str | None = None  # None: the reference's checkpoint


@dataclass
class Workload:
    """What every option is measured on (token ids)."""

    chunks: list[list[int]]  # perplexity text, teacher-forced
    prompts: list[list[int]]
    new_tokens: int


@dataclass
class Scores:
    """One engine's outputs on a workload."""

    chunk_logprobs: list[list[float]]  # per chunk, tokens 1..n-1
    greedy: list[list[int]]  # per prompt
    forced: list[list[float]]  # the reference's continuations, scored


@dataclass
class Row:
    name: str
    weight_bytes: int
    ppl: float
    ppl_change: float  # relative to the reference
    mean_abs_dlogprob: float
    agreement: float  # share of reference greedy tokens reproduced before the first miss
    identical: int  # continuations equal to the reference's
    seconds: float


def add_parser(bsub: Any) -> None:
    p = bsub.add_parser(
        "quant",
        help="quality of int8/int4/AWQ/GPTQ/GGUF weights and int8/fp8 KV vs full precision",
        description="Perplexity, mean |delta logprob| of the chosen tokens and greedy agreement "
        "of each low-precision option against the float32 dequantization of the same "
        f"checkpoint, on {DEFAULT_TEXT}. The last line is `{FINAL_KEY}: X.XX` (percent).",
    )
    p.add_argument("--model", default=None, help="a GGUF file or HF folder (default: SmolLM2)")
    p.add_argument("--text", default=DEFAULT_TEXT, help="English text (default: %(default)s)")
    p.add_argument("--options", default=None, help="comma-separated rows (default: all)")
    p.add_argument("--prompts", type=int, default=32, help="greedy prompts (%(default)s)")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens (%(default)s)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="tokens a prompt (32)")
    p.add_argument("--chunk", type=int, default=512, help="perplexity chunk tokens (512)")
    p.add_argument("--chunks", type=int, default=4, help="perplexity chunks (%(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--quick", action="store_true", help="4 prompts x 8 tokens, 1 chunk of 64")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    p.set_defaults(run=run)


def default_options(
    work_dir: str | None = None, reference_model: str | None = None, names: list | None = None
) -> list:
    """Every row this build can make (or those in `names`). AWQ/GPTQ rows need `work_dir` to
    write their checkpoints in (made from the reference's weights by model/quant_convert.py),
    and are made only when asked for."""
    rows = [
        Option("int8", {"quantization": "int8"}),
        Option("int4 g32", {"quantization": "int4", "quantization_group_size": 32}),
        Option("int4 g64", {"quantization": "int4", "quantization_group_size": 64}),
        Option("kv int8", {"kv_cache_dtype": "int8"}),
        Option("kv fp8_e4m3", {"kv_cache_dtype": "fp8_e4m3"}),
        # the same file's blocks, activations rounded to int8 per block as llama.cpp does
        Option("blocks-int8", {"linear_backend": "blocks-int8"}),
    ]
    converted = names is None or any(n.startswith(("awq", "gptq")) for n in names)
    if work_dir is not None and converted:
        rows += converted_options(work_dir, reference_model)
    requantized = names is None or any(n.startswith("gguf") for n in names)
    if work_dir is not None and requantized:
        rows += gguf_options(work_dir, reference_model, names)
    return rows


def gguf_options(work_dir: str, reference_model: str | None, names: list | None) -> list[Option]:
    """The reference's GGUF file with its layers written again in each llama.cpp type
    (model/gguf_convert.py, round-to-nearest from the reference's values), served from blocks;
    only those in `names` are written when it is given."""
    from splitserve.model import gguf_convert
    from splitserve.model.loader import default_model_path

    src = reference_model or default_model_path()
    if not src.endswith(".gguf"):
        return []
    rows = []
    for type_name, qtype in gguf_convert.TYPES.items():
        name = f"gguf {type_name}"
        if names is not None and name not in names:
            continue
        path = os.path.join(work_dir, f"{type_name}.gguf")
        gguf_convert.convert(src, path, qtype)
        rows.append(Option(name, {}, path))
    return rows


def converted_options(work_dir: str, reference_model: str | None) -> list[Option]:
    """AWQ / GPTQ folders and GGUF files of other types, written from the reference's weights
    (round-to-nearest), each served as its loader serves it."""
    try:
        from splitserve.model import quant_convert
    except ImportError:  # not in this build
        return []
    return [
        Option(name, {}, model)
        for name, model in quant_convert.bench_checkpoints(reference_model, work_dir)
    ]


def make_workload(tokenizer: Any, text: str, args: Any) -> Workload:
    ids = tokenizer.encode(text)
    half = len(ids) // 2
    n_chunks = 1 if args.quick else args.chunks
    chunk = 64 if args.quick else args.chunk
    if half < n_chunks * chunk:
        raise ValueError(f"the text has {len(ids)} tokens; it needs {2 * n_chunks * chunk}")
    chunks = [ids[i * chunk : (i + 1) * chunk] for i in range(n_chunks)]
    n_prompts = 4 if args.quick else args.prompts
    step = (len(ids) - half - args.prompt_tokens) // n_prompts
    prompts = [
        ids[half + i * step : half + i * step + args.prompt_tokens] for i in range(n_prompts)
    ]
    return Workload(chunks, prompts, 8 if args.quick else args.new_tokens)


def score(engine: Any, work: Workload, reference: list[list[int]] | None) -> Scores:
    """Run the workload on one engine: greedy continuations, teacher-forced chunk logprobs
    and, given the reference's continuations, their logprobs under this engine."""
    from splitserve.engine.sampling_params import SamplingParams

    greedy = SamplingParams(
        max_tokens=work.new_tokens, min_tokens=work.new_tokens, temperature=0, ignore_eos=True
    )
    forced = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    jobs: dict[str, tuple[list[int], Any]] = {}
    for i, chunk in enumerate(work.chunks):
        jobs[f"c{i}"] = (chunk, forced)
    for i, prompt in enumerate(work.prompts):
        jobs[f"g{i}"] = (prompt, greedy)
        if reference is not None:
            jobs[f"f{i}"] = (prompt + reference[i], forced)
    tokens: dict[str, list[int]] = {k: [] for k in jobs}
    logprobs: dict[str, list[float]] = {}
    for rid, (prompt, params) in jobs.items():
        engine.add_request(rid, prompt, params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            if out.prompt_logprobs is not None:
                logprobs[out.request_id] = [lp for lp, _ in out.prompt_logprobs]
    n_prompt = len(work.prompts[0])
    return Scores(
        chunk_logprobs=[logprobs[f"c{i}"] for i in range(len(work.chunks))],
        greedy=[tokens[f"g{i}"] for i in range(len(work.prompts))],
        forced=[logprobs[f"f{i}"][n_prompt - 1 :] for i in range(len(work.prompts))]
        if reference is not None
        else [],
    )


def _engine(ckpt: Any, model: str | None, overrides: dict[str, Any], threads: int | None):
    from splitserve.engine.config import EngineConfig
    from splitserve.executors.build import create_engine
    from splitserve.model.loader import open_checkpoint

    fields: dict[str, Any] = dict(
        num_kv_blocks=1024,
        block_size=16,
        enable_prefix_caching=False,  # prompt logprobs of every token, every time
        max_num_seqs=128,
        max_num_batched_tokens=1024,
        num_threads=threads,
        quantization="none",
    )
    fields.update(overrides)
    if model is not None:
        fields["model"] = model
        ckpt = open_checkpoint(model)
        if "quantization" not in overrides:
            fields["quantization"] = "auto"  # AWQ/GPTQ: served in int4, as a user gets them
    return create_engine(EngineConfig(**fields), ckpt)


def evaluate(
    ckpt: Any, option: Option, work: Workload, ref: Scores, threads: int | None = None
) -> Row:
    """One option's row against the reference's scores."""
    start = time.perf_counter()
    engine = _engine(ckpt, option.model, option.overrides, threads)
    reference = ref.greedy
    got = score(engine, work, reference)
    weight_bytes = engine.runner.weight_bytes
    del engine
    ppl_ref, ppl = perplexity(ref.chunk_logprobs), perplexity(got.chunk_logprobs)
    diffs = [abs(a - b) for fa, fb in zip(ref.forced, got.forced, strict=True)
             for a, b in zip(fa, fb, strict=True)]  # fmt: skip
    agree = [same_prefix(a, b) for a, b in zip(reference, got.greedy, strict=True)]
    return Row(
        name=option.name,
        weight_bytes=weight_bytes,
        ppl=ppl,
        ppl_change=ppl / ppl_ref - 1,
        mean_abs_dlogprob=sum(diffs) / len(diffs),
        agreement=sum(agree) / (len(reference) * work.new_tokens),
        identical=sum(a == work.new_tokens for a in agree),
        seconds=time.perf_counter() - start,
    )


def perplexity(chunk_logprobs: list[list[float]]) -> float:
    flat = [lp for c in chunk_logprobs for lp in c]
    return math.exp(-sum(flat) / len(flat))


def same_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two continuations share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def run(args: Any) -> int:
    import tempfile

    import torch

    from splitserve.model.loader import open_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    if not os.path.isfile(args.text):
        print(f"bench quant: no text at {args.text}; pass --text FILE (English prose)")
        return 1
    with open(args.text, encoding="utf-8", errors="replace") as f:
        text = f.read()
    ckpt = open_checkpoint(args.model)
    if ckpt.tokenizer is None:
        print(f"bench quant: {ckpt.path} has no tokenizer")
        return 1
    work = make_workload(ckpt.tokenizer, text, args)
    wanted = [o.strip() for o in args.options.split(",")] if args.options else None
    with tempfile.TemporaryDirectory(prefix="splitserve-quant-") as tmp:
        options = default_options(tmp, ckpt.path, wanted)
        if wanted:
            unknown = sorted(set(wanted) - {o.name for o in options})
            if unknown:
                names = ", ".join(o.name for o in options)
                print(f"bench quant: unknown option(s) {', '.join(unknown)}; choose from {names}")
                return 1
            options = [o for o in options if o.name in wanted]
        rows = compare(ckpt, options, work, args.threads)
    lines = report(ckpt.path, args.text, work, rows)
    int8 = next((r for r in rows if r.name == "int8"), None)
    final = final_line(FINAL_KEY, 100 * int8.ppl_change if int8 else float("nan"))
    doc = {"text": args.text, "rows": [r.__dict__ for r in rows]}
    finish(args, lines, final, lambda: doc)
    return 0


def compare(ckpt: Any, options: list[Option], work: Workload, threads: int | None) -> list[Row]:
    """The reference row, then each option's: the function another benchmark or a test calls
    with its own rows (an `Option` is a name and engine-config overrides)."""
    from tqdm import tqdm

    start = time.perf_counter()
    engine = _engine(ckpt, None, {}, threads)
    first = score(engine, work, None)
    ref = score(engine, work, first.greedy)  # the reference's own continuations, scored
    ref_row = evaluate_self(ref, work, engine.runner.weight_bytes, time.perf_counter() - start)
    del engine
    rows = [ref_row]
    for option in tqdm(options, desc="bench quant", leave=False):
        rows.append(evaluate(ckpt, option, work, ref, threads))
    return rows


def evaluate_self(ref: Scores, work: Workload, weight_bytes: int, seconds: float) -> Row:
    ppl = perplexity(ref.chunk_logprobs)
    return Row("float32 (reference)", weight_bytes, ppl, 0.0, 0.0, 1.0, len(ref.greedy), seconds)


def report(path: str, text: str, work: Workload, rows: list[Row]) -> list[str]:
    n_tokens = sum(len(c) for c in work.chunks)
    head = [
        f"{os.path.basename(path)} on {text}: perplexity over {n_tokens} tokens "
        f"({len(work.chunks)} chunks), greedy {work.new_tokens} tokens on "
        f"{len(work.prompts)} prompts; reference: float32 dequantization, float32 KV",
    ]
    table = format_table(
        [
            "option",
            "weights MB",
            "perplexity",
            "vs ref",
            "mean |dlogprob|",
            "greedy agree",
            "identical",
            "s",
        ],
        [
            [
                r.name,
                f"{r.weight_bytes / 1e6:.0f}",
                f"{r.ppl:.3f}",
                f"{100 * r.ppl_change:+.2f}%",
                f"{r.mean_abs_dlogprob:.4f}",
                f"{100 * r.agreement:.1f}%",
                f"{r.identical}/{len(work.prompts)}",
                f"{r.seconds:.0f}",
            ]
            for r in rows
        ],
    )
    return head + table
