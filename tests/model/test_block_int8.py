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


def test_without_vnni_the_same_numbers_bit_for_bit():
    # The portable build (no AVX-512 at all) runs integer dots and the same float operations
    # in the same order: what a CPU without VNNI serves is what one with it serves.
    portable, native = bl.load_portable_kernel(), bl.load_kernel()
    assert portable is not None and not portable.has_vnni()
    gen = torch.Generator().manual_seed(3)
    for qtype in SERVED:
        _, fmt, packed = packed_weight(qtype, 40, 256)
        x = torch.randn(9, 256, generator=gen) * 3
        for a, b in zip(
            native.quantize_activations(x), portable.quantize_activations(x), strict=True
        ):
            assert torch.equal(a, b), qtype.name
        got = portable.block_linear_int8(x, packed, fmt, 40)
        assert torch.equal(got, native.block_linear_int8(x, packed, fmt, 40)), qtype.name


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
