"""Packed low-precision KV (kv_int8, kv_fp8_e4m3) on the wire: round trips, and never read as
another format."""

import numpy as np
import pytest
import torch

from splitserve.model.kv_quant import QUANTS
from splitserve.wire import kv_codec, kv_payload
from splitserve.wire.kv_codec import (
    KVAssembler,
    KVCodecError,
    check_finite,
    decode_block,
    encode_block,
    split_transfer,
)

KEY = b"k" * 32


def packed(name: str, shape=(2, 2, 4, 3, 8)) -> torch.Tensor:
    return QUANTS[name].quantize(torch.randn(shape))  # (..., 10) bytes


@pytest.mark.parametrize("name", ["int8", "fp8_e4m3"])
def test_blocks_and_transfers_round_trip_under_the_format_name(name):
    fmt = QUANTS[name].wire_name
    block = packed(name)
    payload = encode_block(KEY, block, b"s" * 16, fmt)
    assert kv_payload.parse_header(payload).dtype == fmt
    assert kv_payload.is_valid_payload(payload, KEY)  # the torch-free kvstore accepts it
    assert torch.equal(decode_block(payload, KEY, fmt, block.shape, b"s" * 16), block)
    kv = packed(name, (2, 2, 5, 4, 3, 8))
    header, chunks = split_transfer(kv, 17, chunk_bytes=300, fmt=fmt)
    assert header.dtype == fmt and header.total_bytes == kv.numel()
    asm = KVAssembler(header, fmt, (2, 2, 64, 4, 3, 10))
    for off, data in chunks:
        asm.add(off, data)
    assert torch.equal(asm.finish(), kv)


def test_a_format_is_never_read_as_another():
    int8 = packed("int8")
    payload = encode_block(KEY, int8, None, "kv_int8")
    for other in ("kv_fp8_e4m3", torch.uint8, torch.float32):
        with pytest.raises(KVCodecError) as err:
            decode_block(payload, KEY, other, int8.shape)
        assert err.value.reason == "dtype"
    header, _ = split_transfer(int8[:, :, None], 4, fmt="kv_int8")
    with pytest.raises(KVCodecError, match="kv_int8 \\(--kv-cache-dtype int8\\) does not match "):
        KVAssembler(header, "kv_fp8_e4m3", (2, 2, 9, 4, 3, 8))
    with pytest.raises(KVCodecError, match="--kv-cache-dtype auto"):
        KVAssembler(header, torch.float32, (2, 2, 9, 4, 3, 8))
    with pytest.raises(KVCodecError, match="can't be sent as kv_int8"):
        split_transfer(torch.zeros(2, 2, 1, 4, 3, 8), 4, fmt="kv_int8")  # floats aren't packed


def test_bad_scales_and_fp8_nans_are_refused():
    rows = packed("fp8_e4m3").numpy().reshape(-1, 10).copy()
    check_finite(rows.tobytes(), "kv_fp8_e4m3", 10)
    for spoil in ((0, 9, 0x7F), (1, 9, 0xC0), (2, 3, 0x7F), (3, 4, 0xFF)):
        bad = rows.copy()
        r, c, v = spoil  # an inf/nan scale, a negative scale, fp8 nan codes
        bad[r, c] = v
        if c == 9:
            bad[r, 8] = 0x80 if v == 0x7F else 0
        with pytest.raises(KVCodecError) as err:
            check_finite(bad.tobytes(), "kv_fp8_e4m3", 10)
        assert err.value.reason == "nonfinite"
    int8 = packed("int8").numpy().reshape(-1, 10).copy()
    int8[:, :8] = 0x7F  # 127 is a fine int8 value
    check_finite(int8.tobytes(), "kv_int8", 10)


def test_a_bad_row_across_a_chunk_boundary_is_refused():
    # rows of 10 bytes in chunks of 64: the assembler checks whole rows as they complete, so
    # a row cut in two by a chunk boundary is checked once its second half arrives
    kv = packed("int8", (2, 2, 5, 4, 3, 8)).clone()
    flat = kv.view(-1, 10)
    row = 64 // 10  # bytes 60..69: across the first boundary
    flat[row, 8:] = torch.tensor([0x80, 0x7F], dtype=torch.uint8)  # a nan bfloat16 scale
    header, chunks = split_transfer(kv, 17, chunk_bytes=64, fmt="kv_int8")
    asm = KVAssembler(header, "kv_int8", (2, 2, 64, 4, 3, 10))
    chunks = list(chunks)
    asm.add(*chunks[0])  # the bad row is not whole yet
    with pytest.raises(KVCodecError) as err:
        asm.add(*chunks[1])
    assert err.value.reason == "nonfinite"


@pytest.mark.parametrize("span", [7, 64, 130, 1 << 20])
def test_chunks_are_checked_span_by_span(monkeypatch, span):
    """The assembler checksums and checks a chunk CHECK_SPAN bytes at a time; whatever the span
    (shorter than a row, not a multiple of one, longer than the chunk), a clean transfer
    finishes with the sender's CRC and a bad row inside a chunk is refused with that chunk."""
    monkeypatch.setattr(kv_codec, "CHECK_SPAN", span)
    kv = packed("int8", (2, 2, 5, 4, 3, 8)).clone()
    header, chunks = split_transfer(kv, 17, chunk_bytes=500, fmt="kv_int8")
    asm = KVAssembler(header, "kv_int8", (2, 2, 64, 4, 3, 10))
    for off, data in chunks:
        asm.add(off, data)
    assert torch.equal(asm.finish(), kv)
    flat = kv.view(-1, 10)
    flat[73, 8:] = torch.tensor([0x80, 0x7F], dtype=torch.uint8)  # bytes 730..739: chunk 2
    header, chunks = split_transfer(kv, 17, chunk_bytes=500, fmt="kv_int8")
    asm = KVAssembler(header, "kv_int8", (2, 2, 64, 4, 3, 10))
    chunks = list(chunks)
    asm.add(*chunks[0])
    with pytest.raises(KVCodecError) as err:
        asm.add(*chunks[1])
    assert err.value.reason == "nonfinite"


@pytest.mark.parametrize("row", [10, 11])  # even: scales read as a strided column; odd: copied
def test_every_bad_scale_is_refused_and_the_largest_finite_one_kept(row):
    clean = np.zeros((6, row), dtype=np.uint8)
    check_finite(clean.tobytes(), "kv_int8", row)
    for scale, bad in ((0x7F7F, False), (0x7F80, True), (0x7FC1, True), (0x8000, True),
                       (0xFF80, True), (0x0001, False)):  # fmt: skip
        rows = clean.copy()
        rows[4, -2:] = (scale & 0xFF, scale >> 8)  # little-endian bfloat16
        if not bad:
            check_finite(rows.tobytes(), "kv_int8", row)
            continue
        with pytest.raises(KVCodecError) as err:
            check_finite(rows.tobytes(), "kv_int8", row)
        assert err.value.reason == "nonfinite", hex(scale)


def test_the_assembler_says_when_every_byte_is_in():
    kv = packed("int8", (2, 2, 5, 4, 3, 8)).clone()
    header, chunks = split_transfer(kv, 17, chunk_bytes=500, fmt="kv_int8")
    asm = KVAssembler(header, "kv_int8", (2, 2, 64, 4, 3, 10))
    chunks = list(chunks)
    for off, data in chunks:
        assert not asm.complete
        asm.add(off, data)
    assert asm.complete and torch.equal(asm.finish(), kv)
