"""The int8-activation block matmul (block_linear.cpp's block_linear_int8, `--linear-backend
blocks-int8`): what it computes, bit for bit the same with and without VNNI, how it rounds the
activations, and its refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from test_gguf_blocks import SERVED
from tiny_gguf import stored

from splitserve.model import block_linear as bl
from splitserve.model import cpp_ext
from splitserve.model import gguf_blocks as gb


def packed_weight(qtype, n: int, k: int):
    blocks, w = stored(qtype, n, k)
    ((_, fmt, packed),) = gb.pack_stored(w, [blocks])
    return w, fmt, packed


def rounded(x: torch.Tensor, mod) -> torch.Tensor:
    """x as the kernel sees it: its int8 codes times their block scales (float64)."""
    q, d, _ = mod.quantize_activations(x)
    m, k = x.shape
    return (q.double().view(m, k // 32, 32) * d.double()[..., None]).view(m, k)


@pytest.mark.parametrize("qtype", list(SERVED))
def test_int8_product_is_the_rounded_activations_times_the_weight(qtype):
    n, k = 40, 512  # a ragged last tile
    w, fmt, packed = packed_weight(qtype, n, k)
    mod = bl.load_kernel()
    gen = torch.Generator().manual_seed(1)
    for m in (1, 5, 13):  # one row, a few, and more than one pass of 8 rows
        x = torch.randn(m, k, generator=gen)
        got = mod.block_linear_int8(x, packed, fmt, n).double()
        want = rounded(x, mod) @ w.double().T  # exact integer dots, float32 scaling after
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, atol=1e-6 * scale, rtol=1e-5)
        full = x.double() @ w.double().T  # and near the float32 product, not equal to it
        err = ((got - full).norm() / full.norm()).item()
        assert 1e-4 < err < 0.02, err


def test_activation_rounding():
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    x[1, :32] = 0.0  # an all-zero block: scale 0, codes 0
    x[2, 5] = 100.0  # an outlier sets its block's scale
    q, d, s = bl.load_kernel().quantize_activations(x)
    xs = x.numpy().reshape(3, 2, 32)
    amax = np.abs(xs).max(-1)
    inv = np.where(amax > 0, np.float32(127) / np.maximum(amax, 1e-30), 0).astype(np.float32)
    want_q = np.rint(xs * inv[..., None]).astype(np.int8)  # nearest, ties to even
    assert np.array_equal(q.numpy().reshape(3, 2, 32), want_q)
    assert np.array_equal(d.numpy(), (amax / np.float32(127)).astype(np.float32))
    halves = want_q.astype(np.int32).reshape(3, 4, 16).sum(-1)
    assert np.array_equal(s.numpy(), halves)
    assert int(q.abs().max()) == 127 and d[1, 0].item() == 0.0


def int8_builds():
    """The three int8 kernels: this CPU's own build (AVX-512 VNNI where it has it), one
    built without AVX-512 (the AVX2 kernel on any CPU with AVX2), and the portable one."""
    avx2 = cpp_ext.build(
        "splitserve_block_linear_avx2",
        "block_linear.cpp",
        [*bl.KERNEL_FLAGS, "-mno-avx512f"],
        "AVX2 block kernel",
    )
    builds = [bl.load_kernel(), avx2, bl.load_portable_kernel()]
    assert all(b is not None for b in builds)
    assert [b.int8_path() for b in builds[1:]] == ["avx2", "portable"]
    return builds


def extremes():
    """Q8_0 codes -128/127 and Q6_K codes 0/63 under scales of 127 against activations that
    round to +-127: the largest products each path has to sum without saturating."""
    n, k = 16, 64
    neg = torch.arange(n * k).reshape(n, k) % 3 == 0
    q8 = torch.where(neg, -128, 127).to(torch.int16)
    packed8 = bl.layout(bl.Q8_0, {"d": torch.ones(n, k // 32, dtype=torch.float16)}, q8)
    q6 = torch.where(neg, 0, 63).to(torch.int16)
    f6 = {
        "d": torch.full((n, k // 32), 0.5, dtype=torch.float16),
        "sc": torch.full((n, k // 32, 2), -127, dtype=torch.int8),
    }
    x = torch.where(torch.arange(2 * k).reshape(2, k) % 2 == 0, 1.0, -1.0)
    return [(bl.Q8_0, packed8, n, x), (bl.Q6_K, bl.layout(bl.Q6_K, f6, q6), n, x)]


def test_every_int8_path_gives_the_same_numbers_bit_for_bit():
    # VNNI (where this CPU has it), AVX2 and the portable loop: integer dots, then the same
    # float operations in the same order, so a worker serves the same numbers on any CPU.
    builds = int8_builds()
    gen = torch.Generator().manual_seed(3)
    cases = []
    for qtype in SERVED:
        _, fmt, packed = packed_weight(qtype, 40, 256)
        cases.append((fmt, packed, 40, torch.randn(9, 256, generator=gen) * 3))
    for fmt, packed, n, x in cases + extremes():
        rounded_x = [b.quantize_activations(x) for b in builds]
        for other in rounded_x[1:]:
            assert all(torch.equal(a, b) for a, b in zip(rounded_x[0], other, strict=True))
        got = [b.block_linear_int8(x, packed, fmt, n) for b in builds]
        assert torch.equal(got[0], got[1]) and torch.equal(got[0], got[2]), fmt
    for fmt, packed, n, x in extremes():  # and nothing saturated: x is exact in int8 here
        want = x @ builds[0].block_dequantize(packed, fmt, n, x.shape[1]).T
        got = builds[1].block_linear_int8(x, packed, fmt, n)
        torch.testing.assert_close(got, want, atol=1e-3 * want.abs().max().item(), rtol=0)
        assert want.abs().max() > 200


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        lines = [line for line in f if line.startswith("flags")]
    return set(lines[0].split(":")[1].split()) if lines else set()


def test_amx_gives_the_vnni_paths_numbers_bit_for_bit():
    # On a CPU with AMX-INT8 (Sapphire Rapids and later) batches of amx_min_rows() rows or more
    # go through tile dot products: the same integers per block, then the VNNI path's float
    # operations in its order. Elsewhere the switch can't turn it on.
    k = bl.load_kernel()
    if not {"amx_tile", "amx_int8", "avx512_vnni"} <= cpu_flags():
        assert not k.amx_active() and not k.set_amx(True)
        return
    assert k.amx_active() and k.amx_min_rows() == 8  # built for it and granted the tile state
    gen = torch.Generator().manual_seed(4)
    cases = []
    for qtype in SERVED:
        _, fmt, packed = packed_weight(qtype, 40, 256)  # 40: a last tile of 8 columns
        for rows in (8, 9, 16, 17, 33, 100):
            x = torch.randn(rows, 256, generator=gen) * 3
            x[rows // 2, 32:64] = 0.0  # a block whose activations round to all zeros
            cases.append((fmt, packed, 40, x))
    cases += [(fmt, packed, n, x.repeat(9, 1)) for fmt, packed, n, x in extremes()]
    try:
        for fmt, packed, n, x in cases:
            assert k.set_amx(False) is False
            vnni = k.block_linear_int8(x, packed, fmt, n)
            assert k.set_amx(True) is True
            amx = k.block_linear_int8(x, packed, fmt, n)
            assert torch.equal(amx, vnni), (fmt, x.shape[0])
            assert torch.equal(amx[:3], k.block_linear_int8(x[:3], packed, fmt, n))  # 3 rows: VNNI
    finally:
        k.set_amx(True)


def test_int8_refuses_what_it_cannot_multiply():
    _, fmt, packed = packed_weight(Q.Q4_1, 40, 256)
    mod = bl.load_kernel()
    with pytest.raises(RuntimeError, match="does not match"):
        mod.block_linear_int8(torch.randn(2, 224), packed, fmt, 40)  # K of another weight
    with pytest.raises(RuntimeError, match="float32"):
        mod.block_linear_int8(torch.randn(2, 256, dtype=torch.float64), packed, fmt, 40)
    with pytest.raises(RuntimeError, match="unknown format"):
        mod.block_linear_int8(torch.randn(2, 256), packed, 9, 40)
    assert mod.block_linear_int8(torch.empty(0, 256), packed, fmt, 40).shape == (0, 40)


@pytest.mark.parametrize("rows", [1, 5, 70])
def test_the_residual_add_and_the_norm_in_one_call_are_the_two_calls(rows):
    """add_rms_norm_ (the fused decoder's residual add and the RMS norm after it) leaves x and
    returns exactly what x.add_(d) and rms_norm(x) give."""
    k = bl.load_kernel()
    assert k is not None
    g = torch.Generator().manual_seed(rows)
    x, d, w = torch.randn(rows, 96, generator=g), torch.randn(rows, 96, generator=g), torch.rand(96)
    want_x = x.clone().add_(d)
    want = k.rms_norm(want_x, w, 1e-5)
    got = k.add_rms_norm_(x, d, w, 1e-5)
    assert torch.equal(x, want_x) and torch.equal(got, want)
    with pytest.raises(RuntimeError, match="x's shape"):
        k.add_rms_norm_(x, d[:, :95].contiguous(), w, 1e-5)
