"""Linear layers whose weights stay in the checkpoint's 4- to 8-bit GGUF blocks, on CPU.

Decode on a CPU is bound by memory bandwidth: every step streams every weight once, and in
float32 SmolLM2-135M is 540 MB of them. The GGUF file we serve stores the layers as Q4_1 and
the embedding/LM head as Q8_0, 96 MB in all; the other backends dequantize that to float32 at
load. This one keeps the blocks and dequantizes inside the matmul kernel
(model/csrc/block_linear.cpp), so a step reads ~5.6x fewer bytes.

It is lossless, not a re-quantization. A weight loaded from a GGUF file is packed from the
file's own codes and scales, any of the types model/gguf_blocks.py lists; a float weight from
elsewhere is re-encoded block by block (32 inputs of one output row) as Q4_1 or Q8_0 where that
is exact. Either way the packed weight is checked to dequantize back to exactly the float32
values gguf-py gives. A weight that packs neither way (random weights, an fp16 checkpoint, a
shard not cut on a block boundary) stays on the oneDNN/torch path. The products and sums are
float32, as in the other backends; only the order of the additions differs.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from splitserve.model import cpp_ext

log = logging.getLogger("splitserve")

BLOCK = 32  # inputs per quantization block
TILE = 16  # output columns per packed tile
# The kernel's formats (block_linear.cpp has their layouts); Q4_0 and Q5_0 travel as Q4_1/Q5_1.
Q4_1, Q8_0, Q5_1, Q4_K, Q5_K, Q6_K = range(6)
FORMAT_NAMES = {Q4_1: "Q4_1", Q8_0: "Q8_0", Q5_1: "Q5_1", Q4_K: "Q4_K", Q5_K: "Q5_K", Q6_K: "Q6_K"}
TILE_BYTES = {Q4_1: 320, Q8_0: 544, Q5_1: 384, Q4_K: 352, Q5_K: 416, Q6_K: 448}
# per-block fields in the order a tile stores them (float16 scales, integer sub-scales)
HEADER_FIELDS = {
    Q4_1: ("d", "m"),
    Q8_0: ("d",),
    Q5_1: ("d", "m"),
    Q4_K: ("d", "dmin", "sc", "mn"),
    Q5_K: ("d", "dmin", "sc", "mn"),
    Q6_K: ("d", "sc"),
}
PLANES = {Q4_1: (), Q8_0: (), Q5_1: (4,), Q4_K: (), Q5_K: (4,), Q6_K: (4, 5)}
# fp16 steps tried around the first guess of a block's scale; more never helped on real files.
_SCALE_STEPS = (0, 1, -1, 2, -2)


# No -ffast-math and no contraction: dequantization must round like gguf-py.
KERNEL_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]


def load_kernel():
    """The compiled kernel module, or None if it can't be built here."""
    return cpp_ext.build(
        "splitserve_block_linear",
        "block_linear.cpp",
        KERNEL_FLAGS,
        "C++ block-quantized linear kernel",
    )


def load_portable_kernel():
    """The same kernel built without AVX-512 or AVX2: the scalar paths any x86-64 CPU runs
    (tests hold the vector paths to them)."""
    return cpp_ext.build(
        "splitserve_block_linear_portable",
        "block_linear.cpp",
        [*KERNEL_FLAGS, "-mno-avx512f", "-mno-avx2"],
        "portable block kernel",
    )


def kernel_usable() -> bool:
    """Whether the block kernel builds here with AVX-512 (without it it is correct but slow)."""
    mod = load_kernel()
    return mod is not None and bool(mod.has_avx512())


def _fp16_steps(base: torch.Tensor, step: int) -> torch.Tensor:
    """`base` (non-negative float16) moved `step` representable values, floored at zero."""
    bits = base.view(torch.int16).to(torch.int32) + step
    return bits.clamp(0, 0x7BFF).to(torch.int16).view(torch.float16)


def _search_scales(blocks, guess, decode):
    """For each block, the first fp16 scale near `guess` whose codes dequantize exactly.

    `decode(d)` -> (codes, values) for scales d (float32, one per block). Returns (scales,
    codes) or None when some block has no exact encoding.
    """
    scale = torch.zeros_like(guess)
    codes = torch.zeros(blocks.shape, dtype=torch.int16)
    todo = torch.ones(guess.shape, dtype=torch.bool)
    for step in _SCALE_STEPS:
        cand = _fp16_steps(guess, step)
        q, values = decode(cand.float())
        ok = todo & (values == blocks).all(-1)
        scale = torch.where(ok, cand, scale)
        codes = torch.where(ok[..., None], q, codes)
        todo &= ~ok
        if not todo.any():
            return scale, codes
    return None


def encode_q4_1(weight: torch.Tensor):
    """(d, m, q) with weight == d*q + m exactly per block of 32 inputs, or None.

    d, m: (N, K/32) float16; q: (N, K) uint8 in 0..15.
    """
    n, k = weight.shape
    if k % BLOCK or weight.dtype != torch.float32:
        return None
    blocks = weight.reshape(n, k // BLOCK, BLOCK)
    lo, hi = blocks.amin(-1), blocks.amax(-1)
    m = lo.to(torch.float16)
    if not torch.equal(m.float(), lo):  # q = 0 gives m itself: the minimum must be an fp16
        return None
    m32 = m.float()[..., None]

    def decode(d):
        d = d[..., None]
        q = torch.where(d > 0, ((blocks - m32) / d).round(), 0.0).clamp(0, 15)
        return q.to(torch.int16), d * q + m32  # two roundings, as gguf-py: (d * q) + m

    found = _search_scales(blocks, ((hi - lo) / 15).to(torch.float16), decode)
    if found is None:
        return None
    d, q = found
    return d, m, q.reshape(n, k).to(torch.uint8)


def encode_q8_0(weight: torch.Tensor):
    """(d, q) with weight == d*q exactly per block of 32 inputs, or None.

    d: (N, K/32) float16; q: (N, K) int8.
    """
    n, k = weight.shape
    if k % BLOCK or weight.dtype != torch.float32:
        return None
    blocks = weight.reshape(n, k // BLOCK, BLOCK)
    amax = blocks.abs().amax(-1)

    def decode(d):
        d = d[..., None]
        q = torch.where(d > 0, (blocks / d).round(), 0.0).clamp(-128, 127)
        return q.to(torch.int16), q * d

    found = _search_scales(blocks, (amax / 127).to(torch.float16), decode)
    if found is None:
        return None
    d, q = found
    return d, q.reshape(n, k).to(torch.int8)


def _tiles(x: torch.Tensor, n_pad: int) -> torch.Tensor:
    """(N, K/32, ...) per-row block data -> (N/16 tiles, K/32, 16, ...), zero-padded rows."""
    if n_pad > x.shape[0]:
        x = torch.cat([x, x.new_zeros((n_pad - x.shape[0], *x.shape[1:]))])
    return x.reshape(n_pad // TILE, TILE, *x.shape[1:]).transpose(1, 2)


def _plane(q: torch.Tensor, bit: int) -> torch.Tensor:
    """Bit `bit` of tiled codes (T, B, 16 col, 32 input) as 8 little-endian uint64 masks per
    tile and block, one per group g of 4 inputs: bit 4c+k of mask g = that bit of column c's
    code at input 4g+k (byte 4c+k of the group's codes, as the kernel holds them)."""
    bits = ((q.to(torch.int32) >> bit) & 1).to(torch.uint8).numpy()
    t, b = bits.shape[:2]
    grouped = bits.reshape(t, b, TILE, BLOCK // 4, 4).transpose(0, 1, 3, 2, 4)  # (T,B,g,c,k)
    return np.packbits(grouped.reshape(t, b, -1), axis=-1, bitorder="little")


def layout(fmt: int, fields: dict[str, torch.Tensor], q: torch.Tensor) -> torch.Tensor:
    """The kernel's tile layout (block_linear.cpp) of codes `q` (N, K) and a format's per
    block fields, each (N, K/32) or, for Q6_K's `sc`, (N, K/32, 2)."""
    n, k = q.shape
    n_pad = -(-n // TILE) * TILE
    nblk = k // BLOCK
    heads = [_tiles(fields[name], n_pad) for name in HEADER_FIELDS[fmt]]
    heads = [h.transpose(-1, -2) if h.dim() == 4 else h for h in heads]  # sc[2][16]
    qt = _tiles(q.reshape(n, nblk, BLOCK), n_pad)  # (T, B, 16 col, 32 input)
    raw = [h.contiguous().view(torch.uint8).reshape(*h.shape[:2], -1).numpy() for h in heads]
    t, b = qt.shape[:2]
    if fmt == Q8_0:  # group g: byte 4c+k = column c's code at input 4g+k
        grouped = qt.reshape(t, b, TILE, BLOCK // 4, 4).permute(0, 1, 3, 2, 4)
        raw.append(grouped.contiguous().to(torch.int8).view(torch.uint8).numpy())
    else:  # chunk h: byte 4c+k = input 8h+k (low nibble) and 8h+4+k (high nibble) of column c
        low = (qt & 15).to(torch.uint8).reshape(t, b, TILE, BLOCK // 8, 2, 4)
        nib = (low[..., 0, :] | (low[..., 1, :] << 4)).permute(0, 1, 3, 2, 4)  # (T,B,h,c,k)
        raw.append(nib.contiguous().numpy())
        raw += [_plane(qt, bit) for bit in PLANES[fmt]]
    tiles = [r.reshape(*r.shape[:2], -1) for r in raw]
    packed = np.concatenate(tiles, axis=-1)
    assert packed.shape[-1] == TILE_BYTES[fmt], (fmt, packed.shape)
    return torch.from_numpy(np.ascontiguousarray(packed).reshape(-1))


def pack(fmt: int, weight: torch.Tensor) -> torch.Tensor | None:
    """The kernel's tile layout for a weight that re-encodes exactly as Q4_1 or Q8_0."""
    if fmt == Q4_1:
        enc = encode_q4_1(weight)
        if enc is None:
            return None
        d, m, q = enc
        return layout(fmt, {"d": d, "m": m}, q)
    enc = encode_q8_0(weight)
    if enc is None:
        return None
    d, q = enc
    return layout(fmt, {"d": d}, q)


class BlockLinear(nn.Module):
    """y = x W^T (+ b) with W kept in the kernel's block tiles. Inference only, float32.

    `parts`: [(rows, format, packed)] down the output rows; one part unless a fused weight's
    pieces came from the file in different types (a Q4_K q/k beside a Q6_K v). `int8`: the
    activations are rounded to int8 per block and multiplied in integers (block_linear.cpp's
    block_linear_int8), as llama.cpp does; else float32 math, exact to the weights."""

    def __init__(
        self,
        linear: nn.Module,
        parts: list[tuple[int, int, torch.Tensor]],
        weight_bytes: int,
        int8: bool = False,
    ):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        assert sum(rows for rows, _, _ in parts) == self.out_features
        self.rows = [rows for rows, _, _ in parts]
        self.formats = [fmt for _, fmt, _ in parts]
        for i, (_, _, packed) in enumerate(parts):
            self.register_buffer(f"packed{i}", packed, persistent=False)
        self.weight_bytes = sum(p.numel() for _, _, p in parts)
        self.dense_bytes = weight_bytes
        bias = getattr(linear, "bias", None)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self._kernel = load_kernel()
        self.int8 = int8
        self._matmul = self._kernel.block_linear_int8 if int8 else self._kernel.block_linear

    @property
    def fmt(self) -> int:
        return self.formats[0]

    @property
    def packed(self) -> torch.Tensor:
        return self.packed0

    def _parts(self):
        return [
            (rows, fmt, getattr(self, f"packed{i}"))
            for i, (rows, fmt) in enumerate(zip(self.rows, self.formats, strict=True))
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).contiguous()
        outs = [self._matmul(x2, p, fmt, rows) for rows, fmt, p in self._parts()]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        if self.bias is not None:
            out += self.bias
        return out.view(*lead, self.out_features)

    def dequantized(self) -> torch.Tensor:
        k = self.in_features
        return torch.cat(
            [self._kernel.block_dequantize(p, fmt, rows, k) for rows, fmt, p in self._parts()]
        )

    def extra_repr(self) -> str:
        names = "+".join(FORMAT_NAMES[f] for f in self.formats)
        x = ", int8 activations" if self.int8 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {names}{x}"


class BlockEmbedding(nn.Module):
    """An embedding table kept in Q4_1 or Q8_0 tiles: a lookup dequantizes only the rows it
    asks for, to exactly the float32 values the dense table held. An embedding tied to an LM
    head that went to blocks shares the head's tiles, so the dense table (113 MB for
    SmolLM2's 49152 x 576) is gone instead of kept beside them."""

    def __init__(self, num: int, dim: int, fmt: int, packed: torch.Tensor, shared: bool) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.fmt = num, dim, fmt
        self.register_buffer("packed", packed, persistent=False)
        self.weight_bytes = 0 if shared else packed.numel()  # a shared one is the head's
        self._kernel = load_kernel()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).to(torch.int64)
        rows = self._kernel.block_rows(
            self.packed, self.fmt, self.num_embeddings, self.embedding_dim, flat
        )
        return rows.view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {FORMAT_NAMES[self.fmt]}"


def pack_weight(w: torch.Tensor, stored: list | None = None) -> list | None:
    """[(rows, format, packed)] for a weight: from the file's blocks `stored`
    (model/gguf_blocks.py) when given and exact, else if it re-encodes exactly as Q4_1 or
    Q8_0; None otherwise."""
    if stored:
        from splitserve.model import gguf_blocks  # it builds on this module

        parts = gguf_blocks.pack_stored(w, stored)
        if parts is not None:
            return parts
    for fmt in (Q4_1, Q8_0):
        packed = pack(fmt, w)
        if packed is not None:
            return [(w.shape[0], fmt, packed)]
    return None


def to_blocks(
    linear: nn.Linear, stored: list | None = None, int8: bool = False
) -> BlockLinear | None:
    """A BlockLinear for `linear` if its weight packs (`pack_weight`)."""
    w = linear.weight.detach()
    parts = pack_weight(w, stored)
    if parts is None:
        return None
    return BlockLinear(linear, parts, w.numel() * w.element_size(), int8=int8)


def _stored_parts(model: nn.Module, weight: torch.Tensor) -> list | None:
    """The file's blocks a weight was loaded from, in row order (fused pieces by shard index)."""
    by_shard = getattr(model, "stored_blocks", {}).get(id(weight))
    if not by_shard:
        return None
    return [by_shard[k] for k in sorted(by_shard, key=lambda s: -1 if s is None else s)]


def children_of_type(model: nn.Module, kind: type) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, child) for every module of exactly `kind` below `model`, listed
    before any is swapped."""
    return [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is kind
    ]


def block_linears(model: nn.Module, int8: bool = False) -> int:
    """Swap every nn.Linear below `model` whose weight re-encodes exactly for a BlockLinear;
    returns how many were swapped. The others stay as they are. Embeddings go to blocks too
    (`BlockEmbedding`): one tied to a swapped head shares its tiles, another is packed if
    its table re-encodes exactly. `int8`: the linears multiply with int8 activations
    (`BlockLinear`); lookups stay exact either way."""
    done = 0
    by_weight: dict[int, BlockLinear] = {}  # id of the dense weight a BlockLinear replaced
    for parent, name, child in children_of_type(model, nn.Linear):
        block = to_blocks(child, _stored_parts(model, child.weight), int8=int8)
        if block is not None:
            by_weight[id(child.weight)] = block
            setattr(parent, name, block)
            done += 1
    for parent, name, child in children_of_type(model, nn.Embedding):
        num, dim = child.num_embeddings, child.embedding_dim
        head = by_weight.get(id(child.weight))
        if head is not None:
            setattr(parent, name, BlockEmbedding(num, dim, head.fmt, head.packed, shared=True))
            continue
        parts = pack_weight(child.weight.detach(), _stored_parts(model, child.weight))
        if parts is not None and len(parts) == 1:
            ((_, fmt, packed),) = parts
            setattr(parent, name, BlockEmbedding(num, dim, fmt, packed, shared=False))
    return done
