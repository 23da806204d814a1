"""KV bytes across process boundaries: exact round trips, and every malformed input rejected."""

import pytest
import torch

from splitserve.engine.kv_codec import (
    KVAssembler,
    KVCodecError,
    TransferHeader,
    bytes_to_tensor,
    decode_block,
    encode_block,
    split_transfer,
    tensor_bytes,
)

SHAPE = (2, 2, 4, 3, 8)  # layers, k/v, block_size, kv_heads, head_dim


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_block_roundtrip(dtype):
    block = torch.randn(SHAPE).to(dtype)
    out = decode_block(encode_block(b"k" * 32, block), b"k" * 32, dtype, SHAPE)
    assert torch.equal(out, block)


def test_block_rejects_wrong_key_shape_dtype_and_corruption():
    block = torch.randn(SHAPE)
    payload = encode_block(b"a" * 32, block)
    with pytest.raises(KVCodecError, match="another key"):
        decode_block(payload, b"b" * 32, torch.float32, SHAPE)
    with pytest.raises(KVCodecError, match="expected"):
        decode_block(payload, b"a" * 32, torch.float16, SHAPE)
    with pytest.raises(KVCodecError, match="expected"):
        decode_block(payload, b"a" * 32, torch.float32, (2, 2, 4, 3, 4))
    flipped = bytearray(payload)
    flipped[-1] ^= 0xFF
    with pytest.raises(KVCodecError, match="checksum"):
        decode_block(bytes(flipped), b"a" * 32, torch.float32, SHAPE)
    with pytest.raises(KVCodecError):
        decode_block(payload[:10], b"a" * 32, torch.float32, SHAPE)
    with pytest.raises(KVCodecError, match="magic"):
        decode_block(b"XXXX" + payload[4:], b"a" * 32, torch.float32, SHAPE)


def test_transfer_in_small_chunks_roundtrips():
    kv = torch.randn(2, 2, 5, 4, 3, 8)
    header, chunks = split_transfer(kv, num_tokens=17, chunk_bytes=1000)
    parts = list(chunks)
    assert len(parts) > 1 and all(len(d) <= 1000 for _, d in parts)
    asm = KVAssembler(header, torch.float32, (2, 2, 64, 4, 3, 8))
    for off, data in parts:
        asm.add(off, data)
    assert torch.equal(asm.finish(), kv)


def _header(**kw):
    base = dict(
        dtype="float32",
        shape=(2, 2, 5, 4, 3, 8),
        num_tokens=17,
        total_bytes=2 * 2 * 5 * 4 * 3 * 8 * 4,
        crc32=0,
    )
    return TransferHeader(**{**base, **kw})


@pytest.mark.parametrize(
    "header",
    [
        _header(dtype="pickle"),
        _header(dtype="float16"),
        _header(shape=(2, 2, 5, 4, 3, 9)),  # wrong head_dim
        _header(shape=(2, 2, 500, 4, 3, 8), total_bytes=2 * 2 * 500 * 4 * 3 * 8 * 4),  # > pool
        _header(total_bytes=10**12),  # lies about its size
    ],
)
def test_transfer_header_rejected_before_allocating(header):
    with pytest.raises(KVCodecError):
        KVAssembler(header, torch.float32, (2, 2, 64, 4, 3, 8))


def test_transfer_rejects_gaps_truncation_and_corruption():
    kv = torch.randn(2, 2, 5, 4, 3, 8)
    header, chunks = split_transfer(kv, 17, chunk_bytes=1000)
    parts = list(chunks)
    asm = KVAssembler(header, torch.float32, (2, 2, 64, 4, 3, 8))
    with pytest.raises(KVCodecError, match="order"):
        asm.add(parts[1][0], parts[1][1])
    asm.add(*parts[0])
    with pytest.raises(KVCodecError, match="ended"):
        asm.finish()
    bad = KVAssembler(header, torch.float32, (2, 2, 64, 4, 3, 8))
    for off, data in parts:
        bad.add(off, bytes(len(data)) if off == 0 else data)
    with pytest.raises(KVCodecError, match="checksum"):
        bad.finish()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8])
def test_tensor_bytes_of_a_strided_view_is_its_c_order_bytes(dtype):
    full = (torch.arange(2 * 2 * 5 * 3 * 4) % 97).reshape(2, 2, 5, 3, 4).to(dtype)
    view = full[:, :, 3]  # one block of a stacked export: not contiguous
    assert not view.is_contiguous()
    want = view.contiguous().view(torch.uint8).numpy().tobytes()
    assert tensor_bytes(view) == want
    assert bytes_to_tensor(tensor_bytes(view), dtype, view.shape).equal(view)
