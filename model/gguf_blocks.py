"""A GGUF file's quantized tensors into the block kernel's tiles, with the file's own codes.

llama.cpp's types store, per block of 32 (legacy) or 256 (K types) inputs of one output row,
float16 scales, small integer sub-scales and 4-8-bit codes. The kernel (block_linear.cpp)
reads tiles of 16 output columns instead of rows, so every weight is rearranged once at load;
what it holds is the same numbers: the file's float16 d / m / dmin, its 6-bit (Q4_K, Q5_K)
or 8-bit (Q6_K) sub-scales and its codes, never a float copy and never a new rounding.

| file type | kernel format | bits a weight, file -> kernel |
|---|---|---|
| Q4_0 | Q4_1, m = -8d | 4.5 -> 5.0 |
| Q4_1 | Q4_1 | 5.0 -> 5.0 |
| Q5_0 | Q5_1, m = -16d | 5.5 -> 6.0 |
| Q5_1 | Q5_1 | 6.0 -> 6.0 |
| Q8_0 | Q8_0 | 8.5 -> 8.5 |
| Q4_K | Q4_K | 4.5 -> 5.5 |
| Q5_K | Q5_K | 5.5 -> 6.5 |
| Q6_K | Q6_K | 6.5625 -> 7.0 |

The K types grow because a tile repeats its super-block's d and dmin for every 32 inputs
(one load per column instead of a lookup across tiles).

The scales are read from the file's bytes; the codes are recovered from the loaded float
weight (the file's exact dequantization), and the packed weight is then dequantized by the
kernel and compared with the float weight bit for bit: a weight that does not match exactly
is not served from blocks.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import Q4_K as GGUF_Q4_K

from splitserve.model import block_linear as bl
from splitserve.model.loader import StoredBlocks

log = logging.getLogger("splitserve")

Q = GGMLQuantizationType
KERNEL_FORMAT = {
    Q.Q4_0: bl.Q4_1,
    Q.Q4_1: bl.Q4_1,
    Q.Q5_0: bl.Q5_1,
    Q.Q5_1: bl.Q5_1,
    Q.Q8_0: bl.Q8_0,
    Q.Q4_K: bl.Q4_K,
    Q.Q5_K: bl.Q5_K,
    Q.Q6_K: bl.Q6_K,
}
# largest code of each kernel format (Q8_0 is signed: -128..127)
CODE_MAX = {bl.Q4_1: 15, bl.Q5_1: 31, bl.Q4_K: 15, bl.Q5_K: 31, bl.Q6_K: 63}


def _f16(raw: np.ndarray, at: int) -> torch.Tensor:
    """The float16 at byte `at` of every block: raw (rows, blocks, type_size)."""
    return torch.from_numpy(np.ascontiguousarray(raw[..., at : at + 2]).view(np.float16)[..., 0])


def fields(stored: StoredBlocks) -> tuple[int, dict[str, torch.Tensor]] | None:
    """(kernel format, per-32-input-block fields) from the file's bytes, or None for a type
    the kernel does not take."""
    qtype = Q(stored.qtype)
    fmt = KERNEL_FORMAT.get(qtype)
    if fmt is None:
        return None
    rows, cols = stored.shape
    block, size = GGML_QUANT_SIZES[qtype]
    raw = np.asarray(stored.data).reshape(rows, cols // block, size)
    per = block // bl.BLOCK  # 32-input blocks in one file block: 1, or 8 for K types

    def spread(x: torch.Tensor) -> torch.Tensor:  # one value per file block -> per 32 inputs
        return x.repeat_interleave(per, dim=1) if per > 1 else x

    d = _f16(raw, 0) if qtype != Q.Q6_K else _f16(raw, size - 2)
    if qtype in (Q.Q4_0, Q.Q5_0):  # codes centred on 8 / 16: an offset of -8d / -16d, exact
        return fmt, {"d": d, "m": d * (-8 if qtype == Q.Q4_0 else -16)}
    if qtype in (Q.Q4_1, Q.Q5_1):
        return fmt, {"d": d, "m": _f16(raw, 2)}
    if qtype == Q.Q8_0:
        return fmt, {"d": d}
    if qtype in (Q.Q4_K, Q.Q5_K):
        sc, mn = GGUF_Q4_K.get_scale_min(np.ascontiguousarray(raw[..., 4:16]).reshape(-1, 12))
        sc = torch.from_numpy(sc.astype(np.uint8).reshape(rows, -1))
        mn = torch.from_numpy(mn.astype(np.uint8).reshape(rows, -1))
        return fmt, {"d": spread(d), "dmin": spread(_f16(raw, 2)), "sc": sc, "mn": mn}
    # Q6_K: 16 int8 scales (one per 16 inputs) before d, after 128 + 64 bytes of codes
    sc = torch.from_numpy(np.ascontiguousarray(raw[..., 192:208]).view(np.int8).copy())
    return fmt, {"d": spread(d), "sc": sc.reshape(rows, -1, 2)}


def codes(fmt: int, f: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """Each input's code under the format's scales, from the exactly dequantized weight."""
    n, k = weight.shape
    w = weight.reshape(n, k // bl.BLOCK, bl.BLOCK)
    d = f["d"].float()[..., None]
    if fmt == bl.Q8_0:
        q = torch.where(d != 0, (w / d).round(), 0.0).clamp(-128, 127)
        return q.reshape(n, k).to(torch.int16)
    if fmt == bl.Q6_K:
        scale = (d * f["sc"].float()).repeat_interleave(16, dim=-1)  # (n, blocks, 32)
        q = torch.where(scale != 0, (w / scale).round(), 0.0) + 32
    else:
        if fmt == bl.Q5_1 or fmt == bl.Q4_1:
            scale, offset = d, f["m"].float()[..., None]
        else:
            scale = d * f["sc"].float()[..., None]
            offset = -(f["dmin"].float() * f["mn"].float())[..., None]
        q = torch.where(scale != 0, ((w - offset) / scale).round(), 0.0)
    return q.clamp(0, CODE_MAX[fmt]).reshape(n, k).to(torch.int16)


def pack_stored(
    weight: torch.Tensor, parts: list[StoredBlocks]
) -> list[tuple[int, int, torch.Tensor]] | None:
    """Tiles for a (possibly fused) float weight from the blocks its row ranges came from:
    [(rows, kernel format, packed)], one entry per run of rows in the same format, or None when
    any part does not repack to exactly `weight`."""
    if weight.dtype != torch.float32 or weight.dim() != 2:
        return None
    if sum(p.shape[0] for p in parts) != weight.shape[0]:
        return None
    groups: list[tuple[int, list[dict[str, torch.Tensor]], int]] = []  # (fmt, fields, rows)
    for p in parts:
        got = fields(p)
        if got is None or p.shape[1] != weight.shape[1] or p.shape[1] % bl.BLOCK:
            return None
        fmt, f = got
        if groups and groups[-1][0] == fmt and groups[-1][2] % bl.TILE == 0:
            groups[-1][1].append(f)
            groups[-1] = (fmt, groups[-1][1], groups[-1][2] + p.shape[0])
        else:
            groups.append((fmt, [f], p.shape[0]))
    kernel = bl.load_kernel()
    out, row = [], 0
    for fmt, fs, rows in groups:
        f = {name: torch.cat([x[name] for x in fs]) for name in fs[0]}
        w = weight[row : row + rows]
        packed = bl.layout(fmt, f, codes(fmt, f, w))
        back = kernel.block_dequantize(packed, fmt, rows, w.shape[1])
        if not torch.equal(back, w):
            bad = (back != w).sum().item()
            log.warning(
                "%s blocks of a %s weight do not repack exactly (%d values differ): "
                "served without blocks",
                bl.FORMAT_NAMES[fmt],
                tuple(weight.shape),
                bad,
            )
            return None
        out.append((rows, fmt, packed))
        row += rows
    return out
