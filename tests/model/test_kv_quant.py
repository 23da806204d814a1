"""The KV cache at low precision: packed rows, and both attention backends reading them."""

import pytest
import torch
import torch.nn.functional as F

from splitserve.model.attention import AttentionMetadata, torch_decode
from splitserve.model.cpu_attention import cpp_decode, load_kernel, select_backend
from splitserve.model.kv_quant import QUANTS, check_device, kv_quant, kv_row_bytes

FORMATS = ["int8", "fp8_e4m3"]


@pytest.mark.parametrize("name", FORMATS)
def test_rows_store_the_scale_they_were_quantized_with(name):
    quant = QUANTS[name]
    x = torch.randn(5, 3, 64) * torch.tensor([1e-3, 1.0, 300.0])[None, :, None]
    x[0, 0] = 0  # an all-zero row stays zero, no nan
    rows = quant.quantize(x)
    assert rows.dtype == torch.uint8 and rows.shape == (5, 3, 66)
    scale = rows[..., 64:].contiguous().view(torch.bfloat16).float()[..., 0]
    want = (x.abs().amax(-1).clamp_min(1e-30) / quant.qmax).to(torch.bfloat16).float()
    assert torch.equal(scale, want)
    back = quant.dequantize(rows, torch.float32)
    assert torch.equal(back[0, 0], torch.zeros(64))
    err = (back - x).abs() / x.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    # int8: half a step of 1/127 (plus the bfloat16 scale's rounding); e4m3: 3 mantissa bits
    assert err.max() < (0.0045 if name == "int8" else 0.07)


def test_row_bytes_and_flag_errors():
    assert kv_row_bytes(64, torch.float32, "auto") == 256
    assert kv_row_bytes(64, torch.bfloat16, "int8") == 66
    assert kv_quant("auto") is None
    with pytest.raises(ValueError, match="--kv-cache-dtype 'int4'"):
        kv_quant("int4")
    with pytest.raises(ValueError, match="--kv-cache-dtype int8: head_dim 63 is odd"):
        check_device(QUANTS["int8"], 63, torch.device("cpu"))


def _packed_case(quant, dtype=torch.float32, heads=8, kv_heads=2, hd=32, bs=4, lens=(1, 5, 9, 30)):
    g = torch.Generator().manual_seed(1)
    num_blocks = 40
    k = quant.quantize(torch.randn(num_blocks, bs, kv_heads, hd, generator=g) * 2)
    v = quant.quantize(torch.randn(num_blocks, bs, kv_heads, hd, generator=g))
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, at = [], 0
    for n in lens:
        tables.append(perm[at : at + -(-n // bs)])
        at += len(tables[-1])
    meta = AttentionMetadata.build(bs, tables, [n - 1 for n in lens], [1] * len(lens))
    q = torch.randn(len(lens), heads, hd, generator=g).to(dtype)
    return q, k, v, meta, tables, list(lens)


def _dense(q, k, v, tables, lens, scale):
    outs = []
    for i, (table, n) in enumerate(zip(tables, lens, strict=True)):
        kk = k[table].flatten(0, 1)[:n].transpose(0, 1)
        vv = v[table].flatten(0, 1)[:n].transpose(0, 1)
        o = F.scaled_dot_product_attention(
            q[i].float()[:, None], kk, vv, scale=scale, enable_gqa=True
        )
        outs.append(o[:, 0])
    return torch.stack(outs)


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
def test_both_backends_read_packed_rows_as_their_dequantized_values(name, dtype, atol):
    assert load_kernel() is not None, "the C++ kernel must build on the CI machine"
    quant = QUANTS[name]
    q, k, v, meta, tables, lens = _packed_case(quant, dtype)
    ref = _dense(
        q, quant.dequantize(k, torch.float32), quant.dequantize(v, torch.float32), tables, lens, 0.2
    )
    pool_before = k.clone()
    out_torch = torch_decode(q, k, v, meta, 0.2, quant=quant)
    out_cpp = cpp_decode(q, k, v, meta, 0.2, quant=quant)
    assert out_torch.dtype == out_cpp.dtype == dtype
    torch.testing.assert_close(out_torch.float(), ref, atol=atol, rtol=0)
    torch.testing.assert_close(out_cpp.float(), ref, atol=atol, rtol=0)
    assert torch.equal(k, pool_before)  # reading never writes the pool


def test_the_cpp_kernel_refuses_a_pool_it_would_misread():
    assert load_kernel() is not None
    quant = QUANTS["int8"]
    q, k, v, meta, _, _ = _packed_case(quant)
    with pytest.raises(RuntimeError, match="q's dtype"):
        cpp_decode(q, k, v, meta, 0.2)  # packed bytes through the float path
    with pytest.raises(RuntimeError, match="head_dim \\+ 2"):
        cpp_decode(q, k[..., :-2].contiguous(), v[..., :-2].contiguous(), meta, 0.2, quant=quant)


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_packed_rows_cut_over_threads(name, threads, torch_threads):
    """A long sequence is cut into runs merged afterwards; each run reads the row scales of
    its own tokens."""
    assert load_kernel() is not None
    quant = QUANTS[name]
    q, k, v, meta, tables, lens = _packed_case(quant, lens=(300,), bs=8)
    ref = _dense(
        q, quant.dequantize(k, torch.float32), quant.dequantize(v, torch.float32), tables, lens, 0.2
    )
    torch_threads(threads)
    out = cpp_decode(q, k, v, meta, 0.2, quant=quant)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("name", FORMATS)
def test_writes_quantize_and_prefill_reads_the_cached_prefix(backend, name):
    """A step writes its K/V quantized into their slots; a chunk after a cached prefix attends
    over the prefix's dequantized rows and its own."""
    quant = QUANTS[name]
    attend = select_backend(backend, torch.device("cpu"), quant)
    g = torch.Generator().manual_seed(2)
    bs, kvh, hd, heads = 4, 2, 16, 4
    k_cache = torch.zeros(16, bs, kvh, hd + 2, dtype=torch.uint8)
    v_cache = torch.zeros_like(k_cache)
    table = [7, 2, 11]
    n0, n1 = 6, 5  # prefix, then a chunk
    k = torch.randn(n0 + n1, kvh, hd, generator=g)
    v = torch.randn(n0 + n1, kvh, hd, generator=g)
    q = torch.randn(n0 + n1, heads, hd, generator=g)
    meta0 = AttentionMetadata.build(bs, [table], [0], [n0])
    attend(q[:n0], k[:n0], v[:n0], k_cache, v_cache, meta0, 0.25)
    slots = [table[p // bs] * bs + p % bs for p in range(n0)]
    flat = k_cache.view(-1, kvh, hd + 2)
    assert torch.equal(flat[slots], quant.quantize(k[:n0]))
    meta1 = AttentionMetadata.build(bs, [table], [n0], [n1])
    out = attend(q[n0:], k[n0:], v[n0:], k_cache, v_cache, meta1, 0.25)
    kd, vd = (
        quant.dequantize(quant.quantize(k), torch.float32),
        quant.dequantize(quant.quantize(v), torch.float32),
    )
    mask = torch.arange(n0 + n1)[None, :] <= torch.arange(n0, n0 + n1)[:, None]
    ref = F.scaled_dot_product_attention(
        q[n0:].transpose(0, 1)[None],
        kd.transpose(0, 1)[None],
        vd.transpose(0, 1)[None],
        attn_mask=mask,
        scale=0.25,
        enable_gqa=True,
    )[0].transpose(0, 1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", FORMATS)
def test_the_kernel_reads_every_code_as_torch_does(name):
    """One token of context: the output is that token's V row, value by value, so every one of
    the 256 codes (e4m3's nan codes aside) must come out exactly as torch converts it."""
    assert load_kernel() is not None
    quant = QUANTS[name]
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    if name == "fp8_e4m3":
        codes[(codes & 0x7F) == 0x7F] = 0
    v = torch.zeros(1, 1, 4, 66, dtype=torch.uint8)  # 1 block of 1 token, 4 heads of 64
    v[0, 0, :, :64] = codes.view(4, 64)
    v[0, 0, :, 64:] = torch.ones(4, 1, dtype=torch.bfloat16).view(torch.uint8)  # scale 1
    k = torch.zeros_like(v)
    meta = AttentionMetadata.build(1, [[0]], [0], [1])
    out = cpp_decode(torch.randn(1, 4, 64), k, v, meta, 0.125, quant=quant)
    want = codes.view(quant.value_dtype).float().view(1, 4, 64)
    assert torch.equal(out, want)


@pytest.mark.parametrize("name", FORMATS)
def test_the_cpp_writer_packs_rows_byte_for_byte_as_quantize(name):
    """A decode step on the C++ backend packs its K/V rows in the kernel: the pool must hold
    exactly the bytes KVQuant.quantize gives (the prefill path's), whoever wrote them."""
    quant = QUANTS[name]
    attend = select_backend("cpp", torch.device("cpu"), quant)
    assert attend.decode_writing.keywords["quant"] is quant
    g = torch.Generator().manual_seed(5)
    n, kvh, hd, bs = 6, 3, 64, 4
    for magnitude in (1e-6, 1e-2, 1.0, 40.0, 3e4):
        k = torch.randn(n, kvh, hd, generator=g) * magnitude
        v = torch.randn(n, kvh, hd, generator=g) * magnitude
        k[0, 0] = 0.0  # an all-zero row: the 1e-30 floor, codes 0
        v[1, 2] = torch.arange(hd) * 0.5 - 16  # ties after scaling, both ways
        k[2, 1, 5] = -k[2, 1].abs().max() * 2  # the row's largest |value| negative
        qkv = torch.cat([torch.randn(n, 9 * hd), k.flatten(1), v.flatten(1)], 1)
        k_view = qkv[:, 9 * hd : 12 * hd].view(n, kvh, hd)  # inside a fused QKV row
        v_view = qkv[:, 12 * hd :].view(n, kvh, hd)
        kc = torch.zeros(8, bs, kvh, hd + 2, dtype=torch.uint8)
        vc = torch.zeros_like(kc)
        tables = [[1, 3], [0], [2, 5], [4], [6], [7]]
        lens = [6, 2, 5, 1, 3, 4]
        meta = AttentionMetadata.build(bs, tables, [x - 1 for x in lens], [1] * n)
        q = qkv[:, : 9 * hd].reshape(n, 9, hd).contiguous()
        out = attend.decode_writing(q, k_view, v_view, kc, vc, meta, 0.125)
        slots = meta.slot_mapping
        assert torch.equal(kc.view(-1, kvh, hd + 2)[slots], quant.quantize(k))
        assert torch.equal(vc.view(-1, kvh, hd + 2)[slots], quant.quantize(v))
        assert torch.equal(out, cpp_decode(q, kc, vc, meta, 0.125, quant=quant))


def test_the_cpp_writer_refuses_what_it_would_misread():
    quant = QUANTS["int8"]
    attend = select_backend("cpp", torch.device("cpu"), quant)
    kc = torch.zeros(2, 4, 1, 18, dtype=torch.uint8)
    q, k = torch.randn(1, 2, 16), torch.randn(1, 1, 16)
    meta = AttentionMetadata.build(4, [[1]], [2], [1])
    with pytest.raises(RuntimeError, match="float32"):
        attend.decode_writing(q, k.double(), k.double(), kc, kc.clone(), meta, 0.25)
    with pytest.raises(RuntimeError, match="packed uint8"):
        attend.decode_writing(q, k, k, kc.float(), kc.float(), meta, 0.25)
    far = AttentionMetadata.build(4, [[9]], [2], [1])  # block 9 of a 2-block pool
    with pytest.raises(RuntimeError, match="outside the pool"):
        attend.decode_writing(q, k, k, kc, kc.clone(), far, 0.25)
    assert torch.equal(kc, torch.zeros_like(kc))  # nothing written before the check
