"""Every GGUF type the loader reads is served from its own codes and scales (model/gguf_blocks.py):
exact against gguf-py's dequantization, in the documented bytes, fused pieces of mixed types,
and a whole file through the engine's shard."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from tiny_gguf import stored, write_tiny_gguf
from torch import nn

from splitserve.engine.config import EngineConfig
from splitserve.executors.shard import ModelShard
from splitserve.model import block_linear as bl
from splitserve.model import gguf_blocks as gb
from splitserve.model.loader import StoredBlocks, open_checkpoint
from splitserve.model.parallel import ShardSpec

# file type -> (kernel format, bits a weight in the kernel's tiles)
SERVED = {
    Q.Q4_0: (bl.Q4_1, 5.0),
    Q.Q4_1: (bl.Q4_1, 5.0),
    Q.Q5_0: (bl.Q5_1, 6.0),
    Q.Q5_1: (bl.Q5_1, 6.0),
    Q.Q8_0: (bl.Q8_0, 8.5),
    Q.Q4_K: (bl.Q4_K, 5.5),
    Q.Q5_K: (bl.Q5_K, 6.5),
    Q.Q6_K: (bl.Q6_K, 7.0),
}


def linear_of(weight: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    lin.weight.data = weight
    return lin


@pytest.mark.parametrize("qtype", list(SERVED))
def test_every_type_is_served_from_its_codes_exactly(qtype):
    n, k = 40, 512  # a ragged last tile; two K-type super-blocks per row
    blocks, w = stored(qtype, n, k)
    parts = gb.pack_stored(w, [blocks])
    assert parts is not None
    ((rows, fmt, packed),) = parts
    assert (rows, fmt) == (n, SERVED[qtype][0])
    tiles = -(-n // bl.TILE) * (k // bl.BLOCK)
    assert packed.numel() == tiles * bl.TILE_BYTES[fmt]
    assert bl.TILE_BYTES[fmt] * 8 / (bl.TILE * bl.BLOCK) == SERVED[qtype][1]
    block = bl.to_blocks(linear_of(w), [blocks])
    assert torch.equal(block.dequantized(), w)
    for m in (1, 13, 33):
        x = torch.randn(m, k)
        with torch.inference_mode():  # float32 sums in another order than the reference's
            ref = (x.double() @ w.double().T).float()
            torch.testing.assert_close(block(x), ref, atol=1e-3, rtol=1e-4)
    # an embedding lookup from the same tiles gives the file's rows exactly
    ids = torch.tensor([0, 39, 17])
    assert torch.equal(bl.load_kernel().block_rows(packed, fmt, n, k, ids), w[ids])


def test_a_fused_weight_of_mixed_types_is_served_in_parts():
    # q/k in Q4_K beside v in Q6_K, as llama.cpp's Q4_K_M mixes them in one layer
    (q, wq), (k, wk), (v, wv) = (
        stored(t, r, 256, s) for s, (t, r) in enumerate([(Q.Q4_K, 64), (Q.Q4_K, 32), (Q.Q6_K, 32)])
    )
    w = torch.cat([wq, wk, wv])
    block = bl.to_blocks(linear_of(w), [q, k, v])
    assert block.rows == [96, 32] and block.formats == [bl.Q4_K, bl.Q6_K]
    assert "Q4_K+Q6_K" in repr(block)
    x = torch.randn(5, 256)
    with torch.inference_mode():
        torch.testing.assert_close(block(x), x @ w.T, atol=1e-3, rtol=1e-4)
    assert torch.equal(block.dequantized(), w)


def test_blocks_that_do_not_give_the_weight_are_refused(caplog):
    blocks, w = stored(Q.Q4_K, 16, 256)
    with caplog.at_level(logging.WARNING, logger="splitserve"):
        assert gb.pack_stored(w + 1e-3, [blocks]) is None  # not what the blocks hold
    assert "do not repack exactly" in caplog.text
    assert gb.pack_stored(w[:8], [blocks]) is None  # rows do not add up
    assert gb.pack_stored(w.double(), [blocks]) is None
    f16 = StoredBlocks(int(Q.F16), np.zeros((16, 512), np.uint8), (16, 256))
    assert gb.pack_stored(w, [f16]) is None  # floats: nothing to repack
    # refused blocks leave the layer to the exact re-encoding search, which finds nothing here
    assert bl.to_blocks(linear_of(w + 1e-3), [blocks]) is None


def test_a_file_of_every_type_loads_into_blocks(tmp_path):
    path = str(tmp_path / "tiny.gguf")
    write_tiny_gguf(path)
    ckpt = open_checkpoint(path)

    def shard(backend: str, spec: ShardSpec | None = None) -> ModelShard:
        ecfg = EngineConfig(num_kv_blocks=8, block_size=4, linear_backend=backend)
        return ModelShard(ckpt.config, ecfg, spec or ShardSpec(), 8, ckpt.refs(), ckpt.num_tensors)

    blocks, dense = shard("blocks"), shard("torch")
    got = {
        name: m.formats for name, m in blocks.model.named_modules() if isinstance(m, bl.BlockLinear)
    }
    # tests/tiny_gguf.py's types; a fused weight is in blocks only if every piece is
    assert got == {
        "layers.0.mlp.gate_up_proj": [bl.Q8_0, bl.Q4_1],  # Q8_0 gate, Q4_0 up
        "layers.0.mlp.down_proj": [bl.Q4_K],
        "layers.1.self_attn.qkv_proj": [bl.Q8_0, bl.Q4_1, bl.Q5_1],  # Q8_0, Q4_0, Q5_0
        "layers.1.self_attn.o_proj": [bl.Q5_1],
        "layers.1.mlp.down_proj": [bl.Q6_K],
    }
    assert isinstance(blocks.model.embed_tokens, bl.BlockEmbedding)  # Q8_0 table
    assert not blocks.model.stored_blocks  # the file's views are let go after packing
    assert blocks.weight_bytes < dense.weight_bytes
    # same numbers in, same logits out (the order of additions differs)
    ids = torch.tensor([3, 100, 7, 250])
    with torch.inference_mode():
        hb = blocks.model.compute_logits(blocks.model.embed(ids))
        hd = dense.model.compute_logits(dense.model.embed(ids))
        torch.testing.assert_close(hb, hd, atol=1e-4, rtol=1e-4)
        gen = torch.Generator().manual_seed(0)
        for layer_b, layer_d in zip(blocks.model.layers, dense.model.layers, strict=True):
            x = torch.randn(4, ckpt.config.hidden_size, generator=gen)
            want = layer_d.mlp(x)  # random K-type codes make large weights: a relative bound
            scale = want.abs().max().item()
            torch.testing.assert_close(layer_b.mlp(x), want, atol=1e-4 * scale, rtol=1e-4)
    # a tensor-parallel rank cuts the blocks on their grid; a cut through a K-type super-block
    # (256 inputs, halved to 128 here) leaves that weight to the float path
    rank = shard("blocks", ShardSpec(tp_rank=1, tp_size=2))
    layer = rank.model.layers[1]
    assert layer.self_attn.o_proj.formats == [bl.Q5_1]
    assert layer.self_attn.qkv_proj.formats == [bl.Q8_0, bl.Q4_1, bl.Q5_1]
    assert not isinstance(layer.mlp.down_proj, bl.BlockLinear)


def test_the_portable_path_reads_every_type():
    # Built with AVX-512 switched off: what a CPU without it runs (correct, slow, and never
    # chosen by 'auto'); the same build as test_block_linear's.
    mod = bl.load_portable_kernel()
    assert mod is not None and not mod.has_avx512()
    for qtype, (fmt, _) in SERVED.items():
        blocks, w = stored(qtype, 40, 256)
        ((_, got, packed),) = gb.pack_stored(w, [blocks])
        assert got == fmt
        assert torch.equal(mod.block_dequantize(packed, fmt, 40, 256), w), qtype.name
        x = torch.randn(13, 256)
        ref = (x.double() @ w.double().T).float()
        torch.testing.assert_close(mod.block_linear(x, packed, fmt, 40), ref, atol=1e-3, rtol=1e-4)
