"""Write AWQ or GPTQ checkpoints from our weights, round-to-nearest: the formats, not the methods.

No AWQ/GPTQ checkpoint can be downloaded here, so this makes them: every decoder linear of the
source checkpoint (any GGUF file or HF folder we load) is quantized to 4 bits in groups of
`group_size` inputs, by round-to-nearest (AWQ without its activation-aware scaling search,
GPTQ without its Hessian updates: the packed layout is what a loader must read, and it is the
same), and written as a Hugging Face folder exactly as AutoAWQ ("gemm") or AutoGPTQ (v1)
publish theirs: `model.safetensors` with `qweight/qzeros/scales[/g_idx]` per linear and every
other tensor in float16, `config.json` with the tools' `quantization_config`, and the
tokenizer. Layouts: model/int4_formats.py.

- AWQ: asymmetric (zero_point true): s = (max - min) / 15, z = round(-min / s), as AutoAWQ's
  pseudo-quantizer.
- GPTQ: symmetric (sym true, the hub's usual choice): s = 2 max|w| / 15, z = 8.

    python -m splitserve.model.quant_convert --format awq --out smollm2-awq [--model X]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator

import torch
from safetensors.torch import save_file

from splitserve.model import int4_formats
from splitserve.model.loader import Checkpoint, open_checkpoint

FORMATS = ("awq", "gptq")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rtn_int4(weight: torch.Tensor, group_size: int, symmetric: bool):
    """Round-to-nearest 4-bit codes of `weight` (N, K): (q (N, K), z (N, K/g), s float16
    (N, K/g)) with w ~= (q - z) * s. The scale is rounded to float16 before the codes are
    chosen, so (q - z) * s is exactly what a loader of the file computes."""
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"{k} inputs are not a multiple of the group size {group_size}")
    w = weight.detach().float().reshape(n, k // group_size, group_size)
    if symmetric:
        amax = w.abs().amax(-1)
        s = (2 * amax / 15).clamp(min=1e-8).to(torch.float16).float()
        z = torch.full_like(s, 8)
    else:
        lo, hi = w.amin(-1), w.amax(-1)
        s = ((hi - lo) / 15).clamp(min=1e-5).to(torch.float16).float()
        z = (-torch.round(lo / s)).clamp(0, 15)
    q = (torch.round(w / s[..., None]) + z[..., None]).clamp(0, 15)
    s16 = s.to(torch.float16)
    return q.reshape(n, k).to(torch.int64), z.to(torch.int64), s16


def dequantized(q: torch.Tensor, z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """(q - z) * s, float32 (N, K): the converter's inputs after rounding."""
    n, k = q.shape
    g = k // z.shape[1]
    out = (q.reshape(n, k // g, g) - z[..., None]).float() * s.float()[..., None]
    return out.reshape(n, k)


def quantization_config(fmt: str, group_size: int) -> dict:
    """`config.json`'s quantization_config, as AutoAWQ / AutoGPTQ write it."""
    if fmt == "awq":
        return {
            "quant_method": "awq",
            "bits": 4,
            "group_size": group_size,
            "zero_point": True,
            "version": "gemm",
            "modules_to_not_convert": None,
        }
    return {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": group_size,
        "desc_act": False,
        "sym": True,
        "static_groups": False,
        "true_sequential": True,
        "damp_percent": 0.01,
        "checkpoint_format": "gptq",
        "model_name_or_path": None,
        "model_file_base_name": "model",
    }


def _is_linear(name: str) -> bool:
    return (
        name.startswith("model.layers.")
        and name.endswith(".weight")
        and any(f".{frag}." in name for frag in LINEARS)
    )


def converted_tensors(
    ckpt: Checkpoint, fmt: str, group_size: int, reference: dict | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the output file; `reference` gets each linear's dequantized weight."""
    for name, tensor in ckpt.tensors():
        if not _is_linear(name):
            yield name, tensor.to(torch.float16).contiguous()
            continue
        prefix = name.removesuffix(".weight")
        q, z, s = rtn_int4(tensor, group_size, symmetric=fmt == "gptq")
        if reference is not None:
            reference[name] = dequantized(q, z, s)
        if fmt == "awq":
            parts = int4_formats.pack_awq(q, z, s)
            packed = dict(zip(("qweight", "qzeros", "scales"), parts, strict=True))
        else:
            parts = int4_formats.pack_gptq(q, z, s, group_size)
            packed = dict(zip(("qweight", "qzeros", "scales", "g_idx"), parts, strict=True))
        for part, t in packed.items():
            yield f"{prefix}.{part}", t


def convert(
    model: str | None, out: str, fmt: str, group_size: int = 128, reference: dict | None = None
) -> str:
    """Write `model` (a path, None = the default) as an `fmt` folder at `out`; returns `out`."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: use {', '.join(FORMATS)}")
    ckpt = open_checkpoint(model)
    os.makedirs(out, exist_ok=True)
    tensors = dict(converted_tensors(ckpt, fmt, group_size, reference))
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    config = ckpt.config.to_hf()
    config["torch_dtype"] = "float16"
    config["quantization_config"] = quantization_config(fmt, group_size)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if ckpt.tokenizer is not None:
        _save_tokenizer(ckpt, out)
    return out


def _save_tokenizer(ckpt: Checkpoint, out: str) -> None:
    tok = ckpt.tokenizer
    tok.backend.save(os.path.join(out, "tokenizer.json"))
    config = {
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "chat_template": tok.chat_template,
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def bench_checkpoints(model: str | None, work_dir: str) -> list[tuple[str, str]]:
    """(row name, path) of the checkpoints `splitserve bench quant` compares: AWQ and GPTQ of
    `model` in groups of 64 (128 does not divide SmolLM2's 576-wide layers)."""
    out = []
    for fmt in FORMATS:
        path = os.path.join(work_dir, fmt)
        convert(model, path, fmt, group_size=_group_for(model))
        out.append((f"{fmt} g{_group_for(model)}", path))
    return out


def _group_for(model: str | None) -> int:
    cfg = open_checkpoint(model).config
    widths = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim)
    return next(g for g in (128, 64, 32) if all(w % g == 0 for w in widths))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m splitserve.model.quant_convert",
        description="Write an AWQ (AutoAWQ gemm) or GPTQ (v1) checkpoint from a model's "
        "weights, by round-to-nearest 4-bit quantization.",
    )
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument("--model", default=None, help="a GGUF file or HF folder (default: SmolLM2)")
    p.add_argument("--group-size", type=int, default=None, help="default: 128, or 64/32 if "
                   "128 does not divide the model's widths")  # fmt: skip
    args = p.parse_args(argv)
    group = args.group_size or _group_for(args.model)
    try:
        convert(args.model, args.out, args.format, group)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.format} (group {group}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
