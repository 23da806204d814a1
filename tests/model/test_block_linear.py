"""Block-quantized linears: lossless re-encoding, the C++ kernel's numbers, the model swap."""

import dataclasses
import logging

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize
from gil_probe import ticks_during
from models import TIED_TINY
from torch import nn

from splitserve.engine.config import EngineConfig
from splitserve.executors.shard import ModelShard
from splitserve.model import block_linear as bl
from splitserve.model.cpu_linear import (
    PackedLinear,
    matmul_weight_bytes,
    prepare_linears,
    use_blocks,
)
from splitserve.model.llama import LlamaModel
from splitserve.model.parallel import ShardSpec

Q = GGMLQuantizationType


def gguf_weight(n: int, k: int, qtype: Q, seed: int = 0) -> torch.Tensor:
    """What a GGUF loader yields for a weight stored as `qtype`: llama.cpp's own rounding."""
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) * 0.05
    return torch.from_numpy(dequantize(quantize(w, qtype), qtype).astype(np.float32))


def test_the_kernel_builds_on_the_ci_machine():
    mod = bl.load_kernel()
    assert mod is not None
    assert mod.has_openmp()  # else at::parallel_for runs every strip on one thread


@pytest.mark.parametrize("qtype,fmt", [(Q.Q4_1, bl.Q4_1), (Q.Q8_0, bl.Q8_0)])
@pytest.mark.parametrize("n,k", [(64, 64), (40, 96), (7, 416)])  # ragged tiles, K > 192
def test_pack_is_lossless(qtype, fmt, n, k):
    w = gguf_weight(n, k, qtype)
    packed = bl.pack(fmt, w)
    assert packed is not None
    assert torch.equal(bl.load_kernel().block_dequantize(packed, fmt, n, k), w)
    tiles = -(-n // bl.TILE) * (k // bl.BLOCK)
    assert packed.numel() == tiles * (320 if fmt == bl.Q4_1 else 544)


def test_weights_that_are_not_blocks_are_refused():
    dense = torch.randn(32, 64)
    assert bl.pack(bl.Q4_1, dense) is None and bl.pack(bl.Q8_0, dense) is None
    q8 = gguf_weight(32, 64, Q.Q8_0)
    assert bl.pack(bl.Q4_1, q8) is None  # >16 levels per block
    q4 = gguf_weight(32, 96, Q.Q4_1)
    assert bl.pack(bl.Q4_1, q4[:, 16:80]) is None  # cut off the block grid
    assert bl.pack(bl.Q4_1, q4[:, :48]) is None  # K not a multiple of 32
    assert bl.pack(bl.Q4_1, q4.double()) is None


@pytest.mark.parametrize("rows", [1, 5, 12, 13, 16, 33, 200])
@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q8_0])
def test_block_linear_matches_a_dense_matmul(rows, qtype):
    w = gguf_weight(72, 416, qtype, seed=rows)
    dense = nn.Linear(416, 72, bias=True)
    dense.weight.data = w
    block = bl.to_blocks(dense)
    assert block is not None and block.fmt == (bl.Q4_1 if qtype == Q.Q4_1 else bl.Q8_0)
    x = torch.randn(rows, 416)
    with torch.inference_mode():
        torch.testing.assert_close(block(x), dense(x), atol=2e-5, rtol=1e-5)
        x3 = torch.randn(2, rows, 832)[..., ::2]  # leading dims, non-contiguous
        torch.testing.assert_close(block(x3), dense(x3), atol=2e-5, rtol=1e-5)
    assert torch.equal(block.dequantized(), w)
    assert block.weight_bytes <= w.numel() * 4 * (0.2 if qtype == Q.Q4_1 else 0.3)


def test_the_kernel_rejects_a_mismatched_packing():
    packed = bl.pack(bl.Q4_1, gguf_weight(32, 64, Q.Q4_1))
    with pytest.raises(RuntimeError, match="does not match"):
        bl.load_kernel().block_linear(torch.zeros(2, 96), packed, bl.Q4_1, 32)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        bl.load_kernel().block_linear(torch.zeros(2, 48), packed, bl.Q4_1, 32)


def test_the_kernel_lets_go_of_the_gil():
    """A worker's gRPC threads (a stage's event loop) run while a step computes."""
    w = gguf_weight(512, 2048, Q.Q4_1)
    packed, x = bl.pack(bl.Q4_1, w), torch.randn(256, 2048)
    kernel = bl.load_kernel()
    kernel.block_linear(x, packed, bl.Q4_1, 512)  # warm
    assert ticks_during(lambda: kernel.block_linear(x, packed, bl.Q4_1, 512)) > 0
    dequantize = lambda: [kernel.block_dequantize(packed, bl.Q4_1, 512, 2048) for _ in range(20)]  # noqa: E731
    assert ticks_during(dequantize) > 0
    assert ticks_during(lambda: sum(range(10**6))) == 0  # the probe itself can tell


# wide enough for 32-input blocks
TINY = dataclasses.replace(TIED_TINY, hidden_size=64, intermediate_size=128, head_dim=16)


def gguf_like_model() -> LlamaModel:
    """The tiny model with every weight as a Q4_1 file (a Q8_0 table) would load it."""
    model = LlamaModel(TINY, max_positions=8).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                qtype = Q.Q8_0 if "embed" in name else Q.Q4_1
                p.copy_(gguf_weight(*p.shape, qtype, seed=len(name)))
    return model


def test_block_linears_swap_every_linear_and_the_tied_embedding_shares_the_head():
    model = gguf_like_model()
    ids = torch.tensor([[3, 50], [7, TINY.vocab_size - 1]])
    with torch.inference_mode():
        hidden = model.embed(ids)
        want = model.compute_logits(hidden)
        assert bl.block_linears(model) == 2 * 4 + 1
        assert not any(type(m) in (nn.Linear, nn.Embedding) for m in model.modules())
        assert model.lm_head.fmt == bl.Q8_0 and model.layers[0].mlp.down_proj.fmt == bl.Q4_1
        embed = model.embed_tokens
        assert isinstance(embed, bl.BlockEmbedding) and embed.packed is model.lm_head.packed
        assert embed.weight_bytes == 0  # the head's tiles, counted once
        assert not any(p.shape[0] == TINY.vocab_size for p in model.parameters())  # table gone
        assert torch.equal(model.embed(ids), hidden)  # the same float32 rows, exactly
        torch.testing.assert_close(model.compute_logits(hidden), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("qtype,fmt", [(Q.Q4_1, bl.Q4_1), (Q.Q8_0, bl.Q8_0)])
def test_block_rows_are_the_dense_rows(qtype, fmt):
    w = gguf_weight(40, 96, qtype)  # 40 rows: the last tile is part padding
    packed, kernel = bl.pack(fmt, w), bl.load_kernel()
    ids = torch.tensor([39, 0, 17, 16, 15, 39])
    assert torch.equal(kernel.block_rows(packed, fmt, 40, 96, ids), w[ids])
    assert kernel.block_rows(packed, fmt, 40, 96, ids[:0]).shape == (0, 96)
    with pytest.raises(RuntimeError, match="outside"):
        kernel.block_rows(packed, fmt, 40, 96, torch.tensor([40]))
    with pytest.raises(RuntimeError, match="outside"):
        kernel.block_rows(packed, fmt, 40, 96, torch.tensor([-1]))
    # An untied table that re-encodes exactly goes to blocks on its own.
    emb = nn.Embedding(40, 96)
    emb.weight.data = w
    model = nn.Sequential(emb)
    assert bl.block_linears(model) == 0
    assert isinstance(model[0], bl.BlockEmbedding) and model[0].weight_bytes == packed.numel()
    assert torch.equal(model[0](ids.view(2, 3)), w[ids].view(2, 3, 96))


def test_shard_uses_blocks_where_exact_and_onednn_elsewhere(caplog):
    ecfg = EngineConfig(num_kv_blocks=8, block_size=4, linear_backend="blocks")
    tensors = list(gguf_like_model().hf_tensors())
    # one layer's down_proj made dense: it must stay on oneDNN, the rest go to blocks
    tensors = [
        (n, torch.randn_like(t) if n == "model.layers.1.mlp.down_proj.weight" else t)
        for n, t in tensors
    ]
    shard = ModelShard(TINY, ecfg, ShardSpec(), 8, tensors)
    kinds = [type(m) for m in shard.model.modules()]
    assert kinds.count(bl.BlockLinear) == 8 and kinds.count(PackedLinear) == 1
    assert shard.linears == "8 linears and 1 embedding in Q4_1/Q8_0 blocks, 1 packed for oneDNN"
    dense = ModelShard(
        TINY,
        EngineConfig(num_kv_blocks=8, block_size=4, linear_backend="torch"),
        ShardSpec(),
        8,
        tensors,
    )
    assert shard.weight_bytes < dense.weight_bytes
    # random weights: nothing to keep in blocks, said once
    with caplog.at_level(logging.WARNING, logger="splitserve"):
        ModelShard(TINY, ecfg, ShardSpec(), 8, None)
    assert "no weight re-encodes exactly" in caplog.text


def test_blocks_on_tensor_parallel_shards():
    # column-parallel rows and row-parallel inputs cut on the 32-input block grid stay blocks
    ecfg = EngineConfig(num_kv_blocks=8, block_size=4, linear_backend="blocks")
    tensors = list(gguf_like_model().hf_tensors())
    shard = ModelShard(TINY, ecfg, ShardSpec(tp_rank=1, tp_size=2), 8, tensors)
    assert shard.linears.startswith("9 linears and 1 embedding in Q4_1/Q8_0 blocks")


def test_backend_choice():
    cpu = torch.device("cpu")
    assert use_blocks("blocks", cpu, torch.float32)
    assert use_blocks("auto", cpu, torch.float32) == bl.kernel_usable()
    assert not use_blocks("onednn", cpu, torch.float32)
    assert not use_blocks("auto", cpu, torch.bfloat16)
    with pytest.raises(ValueError, match="float32 on CPU"):
        use_blocks("blocks", cpu, torch.bfloat16)
    with pytest.raises(ValueError, match="unknown linear backend"):
        prepare_linears(gguf_like_model(), "int4", cpu, torch.float32)


def test_the_portable_path_without_avx512():
    # Built here with AVX-512 switched off: what a CPU without it runs (correct, slow, and
    # never chosen by 'auto').
    mod = bl.load_portable_kernel()
    assert mod is not None and not mod.has_avx512()
    for qtype, fmt in [(Q.Q4_1, bl.Q4_1), (Q.Q8_0, bl.Q8_0)]:
        w = gguf_weight(40, 416, qtype)
        packed = bl.pack(fmt, w)
        assert torch.equal(mod.block_dequantize(packed, fmt, 40, 416), w)
        x = torch.randn(13, 416)
        torch.testing.assert_close(
            mod.block_linear(x, packed, fmt, 40), x @ w.T, atol=2e-5, rtol=1e-5
        )


def test_matmul_weight_bytes_counts_what_each_backend_stores():
    model = gguf_like_model()
    dense = matmul_weight_bytes(model)
    assert dense == sum(m.weight.numel() * 4 for m in model.modules() if type(m) is nn.Linear)
    bl.block_linears(model)
    assert matmul_weight_bytes(model) == sum(
        m.packed.numel() for m in model.modules() if isinstance(m, bl.BlockLinear)
    )
    assert matmul_weight_bytes(model) < dense / 4
