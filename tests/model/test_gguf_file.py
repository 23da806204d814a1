"""Our GGUF parser against the `gguf` package's reader on the real SmolLM2 file and on files
`gguf` writes, and its refusals of broken headers."""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest

from splitserve.model.gguf_file import GGUFFile


def _same_as_gguf(path: str) -> GGUFFile:
    ours, theirs = GGUFFile(path), gguf.GGUFReader(path, "r")
    expected = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, float):  # float32 scalars: ours keep the shortest round-trip text
            assert ours.metadata[key] == float(str(np.float32(value))), key
        else:
            assert ours.metadata[key] == value, key
    assert len(ours.tensors) == len(theirs.tensors)
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert (a.name, a.tensor_type, a.shape.tolist()) == (
            b.name,
            b.tensor_type,
            b.shape.tolist(),
        )
        assert (a.n_elements, a.n_bytes, a.data_offset) == (b.n_elements, b.n_bytes, b.data_offset)
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape
        assert np.array_equal(a.data, b.data), a.name
    return ours


def test_smollm2_parses_as_gguf_reads_it(smollm2_path):
    ours = _same_as_gguf(smollm2_path)
    assert len(ours.metadata["tokenizer.ggml.tokens"]) == 49152
    assert ours.metadata["llama.attention.layer_norm_rms_epsilon"] == 1e-05


def _write(path, alignment=None):
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_uint32("a.u32", 7)
    w.add_int64("a.i64", -3)
    w.add_bool("a.flag", True)
    w.add_float32("a.f32", 0.1)
    w.add_float64("a.f64", 0.1)
    w.add_string("a.str", "héllo")
    w.add_array("a.strs", ["x", "", "ÿ"])
    w.add_array("a.ints", [1, 2, 3])
    w.add_array("a.floats", [0.5, 1.5])
    w.add_tensor("f32", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.add_tensor("f16", np.ones((3, 5), dtype=np.float16))
    q = gguf.quants.quantize(
        np.linspace(-1, 1, 128, dtype=np.float32).reshape(2, 64), gguf.GGMLQuantizationType.Q8_0
    )
    w.add_tensor("q8", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("alignment", [None, 64])
def test_every_value_kind_and_tensor_layout(tmp_path, alignment):
    path = tmp_path / "t.gguf"
    _write(path, alignment)
    ours = _same_as_gguf(str(path))
    assert ours.metadata["a.strs"] == ["x", "", "ÿ"] and ours.metadata["a.flag"] is True
    assert ours.metadata["a.f32"] == 0.1 and ours.metadata["a.str"] == "héllo"


def test_broken_headers_are_value_errors(tmp_path):
    path = tmp_path / "t.gguf"
    _write(path)
    good = path.read_bytes()
    cases = {
        "magic": b"GGUX" + good[4:],
        "version": good[:4] + struct.pack("<I", 9) + good[8:],
        "cut in the metadata": good[:200],
        "huge string": good[:24] + struct.pack("<Q", 1 << 60) + good[32:],
        "huge key count": good[:16] + struct.pack("<Q", 1 << 62) + good[24:],
    }
    for what, data in cases.items():
        path.write_bytes(data)
        with pytest.raises(ValueError):
            GGUFFile(str(path))
        assert what
