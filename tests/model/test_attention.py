"""Attention backends agree with each other and with plain dense attention."""

import pytest
import torch
import torch.nn.functional as F
from gil_probe import ticks_during

from splitserve.model import cpu_attention
from splitserve.model.attention import (
    AttentionMetadata,
    torch_decode,
    torch_paged_attention,
    write_kv,
)
from splitserve.model.cpu_attention import (
    cpp_decode,
    cpp_decode_writing,
    load_kernel,
    select_backend,
)
from splitserve.model.kv_quant import QUANTS


def _decode_case(
    dtype, num_seqs=6, heads=8, kv_heads=2, hd=16, bs=4, num_blocks=64, lens=(1, 3, 4, 9, 17, 30)
):
    g = torch.Generator().manual_seed(0)
    k_cache = torch.randn(num_blocks, bs, kv_heads, hd, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, bs, kv_heads, hd, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    lens = list(lens)[:num_seqs]
    tables, at = [], 0
    for n in lens:
        nb = -(-n // bs)
        tables.append(perm[at : at + nb])
        at += nb
    meta = AttentionMetadata.build(bs, tables, [n - 1 for n in lens], [1] * num_seqs)
    q = torch.randn(num_seqs, heads, hd, generator=g).to(dtype)
    return q, k_cache, v_cache, meta, tables, lens


def _dense_reference(q, k_cache, v_cache, tables, lens, scale):
    outs = []
    for i, (table, n) in enumerate(zip(tables, lens, strict=True)):
        k = k_cache[table].flatten(0, 1)[:n].float().transpose(0, 1)  # (kvh, n, hd)
        v = v_cache[table].flatten(0, 1)[:n].float().transpose(0, 1)
        o = F.scaled_dot_product_attention(
            q[i].float()[:, None], k, v, scale=scale, enable_gqa=True
        )
        outs.append(o[:, 0])
    return torch.stack(outs)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_torch_decode_matches_dense(dtype, atol):
    q, kc, vc, meta, tables, lens = _decode_case(dtype)
    ref = _dense_reference(q, kc, vc, tables, lens, 0.25)
    assert torch.allclose(torch_decode(q, kc, vc, meta, 0.25).float(), ref, atol=atol)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_cpp_decode_matches_dense(dtype, atol):
    assert load_kernel() is not None, "the C++ kernel must build on the CI machine"
    q, kc, vc, meta, tables, lens = _decode_case(dtype)
    ref = _dense_reference(q, kc, vc, tables, lens, 0.25)
    assert torch.allclose(cpp_decode(q, kc, vc, meta, 0.25).float(), ref, atol=atol)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(
    "lens,heads,kv_heads",
    [
        ((200,), 8, 2),  # one sequence: one thread's work, the others idle
        ((1, 1, 1, 90, 2, 60, 5, 33, 1, 7), 9, 3),  # skewed lengths, cut by total context
        ((5, 16, 17, 31, 32, 33), 4, 4),  # no GQA; lengths on and around block edges
        ((700,), 9, 3),  # one long sequence, cut into runs of blocks that are merged
        ((333, 260), 8, 2),  # fewer sequences than threads
        ((129, 7), 4, 1),  # a run of one block and a bit; a tile cut short
    ],
)
def test_cpp_decode_any_split_over_threads(threads, lens, heads, kv_heads, torch_threads):
    """The kernel cuts sequences into per-thread runs by context; every cut gives the same
    answer, whatever the thread count and however uneven the lengths."""
    assert load_kernel() is not None
    q, kc, vc, meta, tables, lens = _decode_case(
        torch.float32, len(lens), heads, kv_heads, 16, 16, 64, lens
    )
    ref = _dense_reference(q, kc, vc, tables, lens, 0.3)
    torch_threads(threads)
    out = cpp_decode(q, kc, vc, meta, 0.3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hd", [8, 20, 72, 96, 128])
@pytest.mark.parametrize("threads", [1, 2])
def test_cpp_decode_any_head_dim(hd, threads, torch_threads):
    """Head dims that are not a multiple of the kernel's vector chunks (20: a scalar tail; 72,
    96: chunks of 64 and 32 then 8) and context that is not a multiple of its token tile."""
    assert load_kernel() is not None
    q, kc, vc, meta, tables, lens = _decode_case(torch.float32, 3, 6, 2, hd, 16, 64, (300, 13, 1))
    ref = _dense_reference(q, kc, vc, tables, lens, 0.2)
    torch_threads(threads)
    out = cpp_decode(q, kc, vc, meta, 0.2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_writing_and_attending_in_one_call_is_the_two_steps(dtype):
    """The fused decoder's call: this step's K/V rows (views into a fused QKV row, as the loop
    has them) into their slots, then attention; the pool and the output are exactly what
    write_kv and the kernel give."""
    assert load_kernel() is not None
    q, kc, vc, meta, _, _ = _decode_case(dtype, 6, 8, 2, 16, 4, 64)
    qkv = torch.randn(6, (8 + 2 + 2) * 16).to(dtype)
    k, v = qkv[:, 128:160].view(6, 2, 16), qkv[:, 160:].view(6, 2, 16)
    kc2, vc2 = kc.clone(), vc.clone()
    write_kv(k, v, kc, vc, meta.slot_mapping)
    want = cpp_decode(q, kc, vc, meta, 0.25)
    got = cpp_decode_writing(q, k, v, kc2, vc2, meta, 0.25)
    assert torch.equal(kc2, kc) and torch.equal(vc2, vc) and torch.equal(got, want)
    backend = select_backend("cpp", torch.device("cpu"))
    assert backend.decode_writing is cpp_decode_writing and cpp_decode_writing.kv_format == -1


def test_writing_refuses_a_slot_outside_the_pool_before_writing_anything():
    assert load_kernel() is not None
    q, kc, vc, meta, _, _ = _decode_case(torch.float32, 2, 8, 2, 16, 4, 8, (3, 5))
    k, v = torch.randn(2, 2, 16), torch.randn(2, 2, 16)
    meta.slot_mapping = torch.tensor([1, 8 * 4], dtype=torch.long)  # the second one past the end
    before = kc.clone()
    with pytest.raises(RuntimeError, match="outside the pool"):
        cpp_decode_writing(q, k, v, kc, vc, meta, 0.25)
    assert torch.equal(kc, before)
    with pytest.raises(RuntimeError, match="k/v must be"):
        cpp_decode_writing(q, k[:1], v, kc, vc, meta, 0.25)
    # a packed pool's backend offers the packing writer instead (tests/model/test_kv_quant.py)
    packed = select_backend("cpp", torch.device("cpu"), quant=QUANTS["int8"])
    assert packed.decode_writing.func is cpu_attention.cpp_decode_writing_packed
    assert packed.decode_writing.kv_format == QUANTS["int8"].code  # its DecoderStack's format
    assert getattr(select_backend("torch", torch.device("cpu")), "decode_writing", None) is None


def test_cpp_decode_lets_go_of_the_gil():
    assert load_kernel() is not None
    q, kc, vc, meta, _, _ = _decode_case(torch.float32, 32, 9, 3, 64, 16, 2048, (900,) * 32)
    assert ticks_during(lambda: cpp_decode(q, kc, vc, meta, 0.125)) > 0


def test_prefill_with_cached_prefix_matches_dense():
    torch.manual_seed(0)
    bs, kvh, hd, heads = 4, 2, 8, 4
    kc, vc = torch.zeros(16, bs, kvh, hd), torch.zeros(16, bs, kvh, hd)
    table = [5, 2, 9, 11]
    k_all, v_all = torch.randn(14, kvh, hd), torch.randn(14, kvh, hd)
    q_all = torch.randn(14, heads, hd)
    # first 6 tokens already cached, then a chunk of 8
    pre = AttentionMetadata.build(bs, [table], [0], [6])
    torch_paged_attention(q_all[:6], k_all[:6], v_all[:6], kc, vc, pre, 0.3)
    meta = AttentionMetadata.build(bs, [table], [6], [8])
    out = torch_paged_attention(q_all[6:], k_all[6:], v_all[6:], kc, vc, meta, 0.3)
    ref = F.scaled_dot_product_attention(
        q_all.transpose(0, 1)[None],
        k_all.transpose(0, 1)[None],
        v_all.transpose(0, 1)[None],
        is_causal=True,
        scale=0.3,
        enable_gqa=True,
    )[0].transpose(0, 1)
    assert torch.allclose(out, ref[6:], atol=1e-5)


def test_backend_selection():
    assert select_backend("torch", torch.device("cpu")) is torch_paged_attention
    with pytest.raises(ValueError):
        select_backend("flash", torch.device("cpu"))
