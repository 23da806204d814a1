"""model/gguf_convert.py: GGUF files written again in another llama.cpp type, K types included."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize
from tiny_gguf import FFN, HIDDEN, write_tiny_gguf

from splitserve.model import gguf_blocks as gb
from splitserve.model import gguf_convert as gc
from splitserve.model.gguf_file import GGUFFile
from splitserve.model.loader import StoredBlocks, open_checkpoint

# mean |error| / mean |w| that round-to-nearest must stay under, per type
REL_ERROR = {Q.Q4_K: 0.12, Q.Q5_K: 0.06, Q.Q6_K: 0.03}


@pytest.mark.parametrize("qtype", list(REL_ERROR))
def test_k_quantizers_write_blocks_gguf_reads(qtype):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((24, 512)).astype(np.float32) * 0.05
    w[3] *= 40  # one row far larger: its own super-block scales must follow it
    blocks, used = gc.quantize_as(w, qtype)
    assert used == qtype
    back = dequantize(blocks, qtype).reshape(w.shape)
    rel = np.abs(back - w).sum(1) / np.abs(w).sum(1)
    assert rel.max() < REL_ERROR[qtype], rel.max()
    # and the kernel serves exactly what gguf-py reads
    weight = torch.from_numpy(back.astype(np.float32))
    assert gb.pack_stored(weight, [StoredBlocks(int(qtype), blocks, w.shape)]) is not None


def test_k_types_fall_back_where_the_width_is_not_256():
    w = np.ones((4, 576), np.float32)
    assert [gc.quantize_as(w, t)[1] for t in (Q.Q4_K, Q.Q5_K, Q.Q6_K)] == [Q.Q5_0, Q.Q5_1, Q.Q8_0]


@pytest.mark.parametrize("name", ["Q4_K", "Q5_0"])
def test_a_converted_file_loads_with_the_same_config(tmp_path, name):
    src, out = str(tmp_path / "src.gguf"), str(tmp_path / f"{name}.gguf")
    write_tiny_gguf(src)
    used = gc.convert(src, out, gc.TYPES[name])
    types = {t.name: t.tensor_type for t in GGUFFile(out).tensors}
    if name == "Q4_K":  # only ffn_down is 256 wide (FFN inputs); the rest fall back
        assert FFN % 256 == 0 and HIDDEN % 256
        assert types["blk.0.ffn_down.weight"] == Q.Q4_K
        assert types["blk.1.attn_q.weight"] == Q.Q5_0
    else:
        assert {types[f"blk.{i}.ffn_up.weight"] for i in range(2)} == {Q.Q5_0}
    assert types["token_embd.weight"] == Q.Q8_0 and types["blk.0.attn_norm.weight"] == Q.F32
    assert sum(used.values()) == len(types)
    a, b = open_checkpoint(src), open_checkpoint(out)
    assert dataclasses.replace(a.config, name="x") == dataclasses.replace(b.config, name="x")
    assert a.tokenizer.encode("hello world") == b.tokenizer.encode("hello world")
    wa = dict(a.tensors({"model.layers.0.mlp.up_proj.weight"}))
    wb = dict(b.tensors({"model.layers.0.mlp.up_proj.weight"}))
    (x,), (y,) = wa.values(), wb.values()
    assert x.shape == y.shape and (x - y).abs().mean() < 0.1 * x.abs().mean()


def test_the_cli_says_what_it_wrote_or_why_not(tmp_path, capsys):
    assert gc.main(["--type", "Q6_K", "--out", str(tmp_path / "x.gguf"), "--model", "/nope"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("gguf_convert:") and "\n" not in err


def test_a_conversion_that_fails_half_way_leaves_no_file(tmp_path, monkeypatch):
    src, out = str(tmp_path / "src.gguf"), tmp_path / "out.gguf"
    write_tiny_gguf(src)

    def broken(w, qtype):
        raise ValueError("killed half-way")

    monkeypatch.setattr(gc, "quantize_as", broken)
    with pytest.raises(ValueError, match="half-way"):
        gc.convert(src, str(out), Q.Q6_K)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.gguf"]
