"""KV bytes across process boundaries: exact round trips, and every malformed input rejected."""

import pytest
import torch

from splitserve.wire import kv_payload
from splitserve.wire.kv_codec import (
    KVAssembler,
    KVCodecError,
    TransferHeader,
    bytes_to_tensor,
    check_finite,
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


# ---- signed blocks (the mesh secret) -------------------------------------------------------
SECRET = b"0123456789abcdef-mesh-secret"
KEY = b"a" * 32


def _reason(payload: bytes, key: bytes = KEY, secret: bytes | None = SECRET, **kw) -> str:
    with pytest.raises(KVCodecError) as err:
        decode_block(payload, key, kw.get("dtype", torch.float32), kw.get("shape", SHAPE), secret)
    return err.value.reason


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_signed_block_roundtrip(dtype):
    block = torch.randn(SHAPE).to(dtype)
    payload = encode_block(KEY, block, SECRET)
    header = kv_payload.parse_header(payload)
    assert header.version == kv_payload.VERSION_SIGNED and len(header.tag) == 32
    assert torch.equal(decode_block(payload, KEY, dtype, SHAPE, SECRET), block)
    # A reader without the secret (the kvstore, an unsigned mesh) still checks its structure.
    assert kv_payload.is_valid_payload(payload, KEY)
    assert torch.equal(decode_block(payload, KEY, dtype, SHAPE), block)


def test_signed_block_rejections_name_their_reason():
    block = torch.randn(SHAPE)
    signed = encode_block(KEY, block, SECRET)
    data_at = kv_payload.parse_header(signed).data_offset

    def flipped(at: int) -> bytes:
        out = bytearray(signed)
        out[at] ^= 0x01
        return bytes(out)

    # The attack: another block's bytes under this key, with its tag copied, or re-signed by
    # someone without the secret.
    other = encode_block(b"b" * 32, torch.randn(SHAPE), SECRET)
    rekeyed = other.replace(b"b" * 32, KEY, 1)
    assert _reason(rekeyed) == "signature"
    assert _reason(encode_block(KEY, block, b"not-the-mesh-secret!")) == "signature"
    assert _reason(encode_block(KEY, block)) == "unsigned"  # version 1 where 2 is required
    assert _reason(flipped(data_at - 1)) == "signature"  # the tag itself
    assert _reason(flipped(data_at + 5)) == "checksum"  # data: the CRC catches it first
    assert _reason(signed, key=b"c" * 32) == "key"
    assert _reason(signed, dtype=torch.float16) == "dtype"
    assert _reason(signed, shape=(2, 2, 4, 3, 4)) == "shape"
    assert _reason(signed[: data_at - 10]) == "truncated"  # inside the tag
    assert _reason(signed[:-4]) == "truncated"
    assert _reason(signed + b"\0") == "size"
    assert _reason(signed[:4] + bytes([7]) + signed[5:]) == "version"
    assert _reason(b"XXXX" + signed[4:]) == "format"
    assert _reason(b"SS") == "truncated"
    nan = block.clone()
    nan[1, 0, 2, 1, 3] = float("nan")
    assert _reason(encode_block(KEY, nan, SECRET)) == "nonfinite"
    # The tag covers the header too: the same bytes declared (2, 2, 4, 8, 3) instead of
    # (2, 2, 4, 3, 8) keep their size and checksum, and fail only on the signature.
    reshaped = bytearray(signed)
    reshaped[19:27] = reshaped[23:27] + reshaped[19:23]
    assert kv_payload.parse_header(bytes(reshaped)).shape == (2, 2, 4, 8, 3)
    assert _reason(bytes(reshaped), shape=(2, 2, 4, 8, 3)) == "signature"


def test_every_reason_is_a_known_label():
    assert len(set(kv_payload.REASONS)) == len(kv_payload.REASONS)
    for exc in (KVCodecError("x"), KVCodecError("x", "shape")):
        assert exc.reason in kv_payload.REASONS


def test_load_mesh_secret(tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(b"  " + SECRET + b"\n")
    assert kv_payload.load_mesh_secret(str(path), {}) == SECRET  # whitespace is not the secret
    env = {kv_payload.MESH_SECRET_ENV: "from-the-environment-0123"}
    assert kv_payload.load_mesh_secret(None, env) == b"from-the-environment-0123"
    assert kv_payload.load_mesh_secret(str(path), env) == SECRET  # the flag wins
    assert kv_payload.load_mesh_secret(None, {}) is None
    assert kv_payload.load_mesh_secret(None, None) is None  # the kvstore: no environment
    with pytest.raises(ValueError, match="at least 16"):
        kv_payload.load_mesh_secret(None, {kv_payload.MESH_SECRET_ENV: "short"})
    with pytest.raises(ValueError, match="nope"):
        kv_payload.load_mesh_secret(str(tmp_path / "nope"), {})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_transfers_with_inf_or_nan_are_refused(dtype, bad):
    kv = torch.randn(2, 2, 5, 4, 3, 8).to(dtype)
    kv[1, 1, 4, 3, 2, 7] = bad  # the very last value
    header, chunks = split_transfer(kv, 17)
    asm = KVAssembler(header, dtype, (2, 2, 64, 4, 3, 8))
    with pytest.raises(KVCodecError) as err:  # as the chunk holding it arrives
        for off, data in chunks:
            asm.add(off, data)
    assert err.value.reason == "nonfinite"
    biggest = torch.tensor([torch.finfo(dtype).max, torch.finfo(dtype).min], dtype=dtype)
    check_finite(tensor_bytes(biggest), dtype)  # large is fine; only inf and nan are not
