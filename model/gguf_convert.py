"""Write a GGUF file's layers again in another llama.cpp type, round-to-nearest.

No Q4_K_M or Q5_0 SmolLM2 can be downloaded here, so this makes them: every decoder weight
(`blk.N.attn_*`, `blk.N.ffn_*`) of a GGUF file is dequantized and quantized again to the asked
type; the token embedding, the norms and every metadata key are copied as they are. Legacy
types go through gguf-py's own quantizers; gguf-py has none for the K types, so they are
written here, round-to-nearest in each 32- (Q4_K, Q5_K) or 16-input (Q6_K) sub-block with
6-/8-bit sub-scales (llama.cpp also searches the scale that minimises the error; this does
not: the layout is what a loader must read, and it is the same). A weight whose input width
is not a multiple of 256 can't be a K type: it falls back as llama.cpp's quantize does
(Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0).

    python -m splitserve.model.gguf_convert --type Q4_K --out smollm2-q4_k.gguf [--model X]
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

TYPES = {t.name: t for t in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K)}
K_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}
LAYER_WEIGHT = re.compile(r"blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down))\.weight")
QK = 256  # inputs per K-type super-block


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)[..., None].view(np.uint8)


def _scale_min_bytes(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins per super-block -> the 12 bytes Q4_K/Q5_K store (the
    inverse of gguf-py's `Q4_K.get_scale_min`)."""
    out = np.zeros((*sc.shape[:-1], 12), np.uint8)
    out[..., 0:4] = (sc[..., 0:4] & 0x3F) | ((sc[..., 4:8] >> 4) << 6)
    out[..., 4:8] = (mn[..., 0:4] & 0x3F) | ((mn[..., 4:8] >> 4) << 6)
    out[..., 8:12] = (sc[..., 4:8] & 0x0F) | ((mn[..., 4:8] & 0x0F) << 4)
    return out


def quantize_k_minmax(w: np.ndarray, bits: int) -> np.ndarray:
    """Q4_K (bits 4) or Q5_K (bits 5) blocks of `w` (rows, cols), cols a multiple of 256."""
    rows, cols = w.shape
    top = (1 << bits) - 1
    sub = w.reshape(rows, cols // QK, 8, 32).astype(np.float32)
    lo = np.minimum(sub.min(-1), 0.0)  # as llama.cpp: the offset never goes above zero
    scale = (sub.max(-1) - lo) / top
    d = (scale.max(-1) / 63).astype(np.float16).astype(np.float32)
    dmin = (-lo.min(-1) / 63).astype(np.float16).astype(np.float32)
    sc = np.where(d[..., None] > 0, np.rint(scale / np.maximum(d[..., None], 1e-30)), 0)
    mn = np.where(dmin[..., None] > 0, np.rint(-lo / np.maximum(dmin[..., None], 1e-30)), 0)
    sc, mn = np.clip(sc, 0, 63).astype(np.uint8), np.clip(mn, 0, 63).astype(np.uint8)
    D = (d[..., None] * sc.astype(np.float32))[..., None]
    M = (dmin[..., None] * mn.astype(np.float32))[..., None]
    q = np.where(D > 0, np.rint((sub + M) / np.where(D > 0, D, 1)), 0)
    q = np.clip(q, 0, top).astype(np.uint8)  # (rows, blocks, 8, 32)
    low = q & 0x0F
    qs = (low[..., 0::2, :] | (low[..., 1::2, :] << 4)).reshape(rows, cols // QK, 128)
    parts = [_f16_bytes(d), _f16_bytes(dmin), _scale_min_bytes(sc, mn)]
    if bits == 5:  # bit i of byte j: sub-block i's input j, fifth bit
        high = (q >> 4) & 1
        qh = (high << np.arange(8, dtype=np.uint8)[:, None]).sum(-2).astype(np.uint8)
        parts.append(qh)
    parts.append(qs)
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def quantize_q6_k(w: np.ndarray) -> np.ndarray:
    """Q6_K blocks of `w` (rows, cols), cols a multiple of 256: 6-bit codes in 16-input
    sub-blocks with int8 sub-scales and a float16 d."""
    rows, cols = w.shape
    sub = w.reshape(rows, cols // QK, 16, 16).astype(np.float32)
    amax_at = np.abs(sub).argmax(-1)
    peak = np.take_along_axis(sub, amax_at[..., None], -1)[..., 0]  # signed, as llama.cpp
    scale = peak / -32
    d = (np.abs(scale).max(-1) / 127).astype(np.float16).astype(np.float32)
    sc = np.where(d[..., None] > 0, np.rint(scale / np.maximum(d[..., None], 1e-30)), 0)
    sc = np.clip(sc, -128, 127).astype(np.int8)
    D = (d[..., None] * sc.astype(np.float32))[..., None]
    q = np.where(D != 0, np.rint(sub / np.where(D != 0, D, 1)), 0)
    q = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(rows, cols // QK, 2, 4, 32)
    # half h of the block, quarter u: inputs 128h + 32u + c
    low, high = q & 0x0F, q >> 4
    ql = np.concatenate([low[:, :, :, 0] | (low[:, :, :, 2] << 4),
                         low[:, :, :, 1] | (low[:, :, :, 3] << 4)], axis=-1)  # fmt: skip
    qh = (
        high[:, :, :, 0]
        | (high[:, :, :, 1] << 2)
        | (high[:, :, :, 2] << 4)
        | (high[:, :, :, 3] << 6)
    )
    parts = [ql.reshape(rows, -1, 128), qh.reshape(rows, -1, 64), sc.view(np.uint8), _f16_bytes(d)]
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def quantize_as(w: np.ndarray, qtype: Q) -> tuple[np.ndarray, Q]:
    """(blocks, the type used) for a float32 weight (rows, cols); K types fall back when cols
    is not a multiple of 256."""
    if qtype in K_FALLBACK and w.shape[1] % QK:
        qtype = K_FALLBACK[qtype]
    if qtype in (Q.Q4_K, Q.Q5_K):
        return quantize_k_minmax(w, 4 if qtype == Q.Q4_K else 5), qtype
    if qtype == Q.Q6_K:
        return quantize_q6_k(w), qtype
    return quantize(w, qtype), qtype


def convert(src: str, out: str, qtype: Q) -> dict[str, int]:
    """Write `src` to `out` with its layer weights in `qtype`; returns {type name: tensors}.

    The file is written beside `out` and renamed into place at the end, so a conversion that
    is killed half-way leaves no truncated .gguf under the name a server would be given."""
    reader = gguf.GGUFReader(src)
    arch = str(reader.fields["general.architecture"].contents())
    partial = f"{out}.partial"
    try:
        used = _write(reader, gguf.GGUFWriter(partial, arch), qtype)
        os.replace(partial, out)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return used


def _write(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, qtype: Q) -> dict[str, int]:
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub)
    used: dict[str, int] = {}
    for t in reader.tensors:
        data, raw_type = np.asarray(t.data), Q(t.tensor_type)
        if LAYER_WEIGHT.fullmatch(t.name) and raw_type not in (Q.F32,):
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            w = dequantize(data, raw_type).reshape(shape).astype(np.float32)
            data, raw_type = quantize_as(w, qtype)
        used[raw_type.name] = used.get(raw_type.name, 0) + 1
        writer.add_tensor(t.name, data, raw_dtype=None if raw_type == Q.F32 else raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return used


def main(argv: list[str] | None = None) -> int:
    from splitserve.model.loader import default_model_path

    p = argparse.ArgumentParser(
        prog="python -m splitserve.model.gguf_convert",
        description="Write a GGUF file's layer weights again in another llama.cpp type "
        "(round-to-nearest; the embedding, norms and metadata are copied).",
    )
    p.add_argument("--type", required=True, choices=sorted(TYPES))
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--model", default=None, help="a GGUF file (default: SmolLM2 Q4_1)")
    args = p.parse_args(argv)
    try:
        used = convert(args.model or default_model_path(), args.out, TYPES[args.type])
    except (OSError, ValueError, KeyError) as e:
        print(f"gguf_convert: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: " + ", ".join(f"{n} {c}" for n, c in sorted(used.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
