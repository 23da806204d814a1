"""oneDNN packed linears: same numbers as nn.Linear, and the swap leaves a working model."""

import pytest
import torch
from models import TIED_TINY as TINY
from torch import nn

from splitserve.engine.config import EngineConfig
from splitserve.executors.shard import ModelShard
from splitserve.model import cpu_linear
from splitserve.model.cpu_linear import (
    PackedLinear,
    linear_weight_bytes,
    onednn_available,
    pack_linears,
    use_onednn,
)
from splitserve.model.llama import LlamaModel
from splitserve.model.parallel import ShardSpec


def test_onednn_is_available_on_the_ci_machine():
    # CI runs on x86 CPUs with torch's CPU wheel: if this ever fails, the engine silently got
    # ~2x slower, which a benchmark would show long after the fact.
    assert onednn_available()


@pytest.mark.parametrize(
    "dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"]
)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 33])
def test_packed_linear_matches_nn_linear(dtype, tol, bias, rows):
    torch.manual_seed(0)
    dense = nn.Linear(48, 80, bias=bias).to(dtype)
    if not onednn_available(dtype):
        # bfloat16 on a CPU oneDNN can't run it (no AVX-512 BW/VL/DQ): auto falls back to
        # torch's linear, and asking for onednn says why.
        assert dtype == torch.bfloat16
        assert not use_onednn("auto", torch.device("cpu"), dtype)
        with pytest.raises(RuntimeError, match=r"can't run torch\.bfloat16"):
            use_onednn("onednn", torch.device("cpu"), dtype)
        return
    packed = PackedLinear(dense)
    x = torch.randn(rows, 48).to(dtype)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), dense(x), atol=tol, rtol=tol)
        # any leading shape, and a non-contiguous input
        x3 = torch.randn(2, rows, 96).to(dtype)[..., ::2]
        torch.testing.assert_close(packed(x3), dense(x3), atol=tol, rtol=tol)
    assert packed.weight_bytes == 48 * 80 * dense.weight.element_size()


def test_pack_linears_keeps_the_model_and_the_tied_embedding():
    torch.manual_seed(1)
    model = LlamaModel(TINY, max_positions=8).eval()
    ids = torch.tensor([3, 50, 7])
    with torch.inference_mode():
        hidden = model.embed(ids)
        want = model.compute_logits(hidden)
        assert pack_linears(model) == 2 * 4 + 1  # qkv, o, gate_up, down per layer; the head
        assert not any(type(m) is nn.Linear for m in model.modules())
        # the embedding still looks up the dense table the head was packed from
        torch.testing.assert_close(model.embed(ids), hidden)
        torch.testing.assert_close(model.compute_logits(hidden), want, atol=1e-5, rtol=1e-5)
    assert linear_weight_bytes(model) > 96 * 32 * 4  # the head's packed copy is counted


def test_backend_choice():
    cpu = torch.device("cpu")
    assert use_onednn("auto", cpu, torch.float32)
    assert use_onednn("auto", cpu, torch.bfloat16) == onednn_available(torch.bfloat16)
    assert not use_onednn("torch", cpu, torch.float32)
    assert not use_onednn("auto", cpu, torch.float16)  # oneDNN here is for fp32 and bf16
    assert not use_onednn("auto", torch.device("cuda"), torch.float32)
    with pytest.raises(ValueError, match="unknown linear backend"):
        use_onednn("mkl", cpu, torch.float32)
    with pytest.raises(ValueError, match="float32/bfloat16 on CPU"):
        use_onednn("onednn", cpu, torch.float16)


@pytest.mark.parametrize("linear", ["torch", "onednn"])
def test_shard_weight_bytes_and_logits_agree_across_backends(linear):
    ecfg = EngineConfig(num_kv_blocks=8, block_size=4, linear_backend=linear)
    shard = ModelShard(TINY, ecfg, ShardSpec(), 8, None)
    packed = [m for m in shard.model.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == (9 if linear == "onednn" else 0)
    dense_bytes = sum(p.numel() * 4 for p in LlamaModel(TINY, max_positions=8).parameters())
    head = TINY.vocab_size * TINY.hidden_size * 4
    # packed: the tied head's copy is extra memory, and counted
    assert shard.weight_bytes == dense_bytes + (head if linear == "onednn" else 0)


@pytest.mark.parametrize(
    ("backend", "avx512", "int8_path", "warned"),
    [
        ("blocks", False, "avx2", "float32 block kernel runs a portable loop"),
        ("blocks", True, "avx512-vnni", None),
        ("blocks-int8", False, "avx2", None),
        ("blocks-int8", False, "portable", "neither AVX-512 VNNI nor AVX2"),
    ],
)
def test_a_block_backend_without_its_fast_kernel_says_so(
    monkeypatch, caplog, backend, avx512, int8_path, warned
):
    """On a CPU without the kernel's vector path the block backends still run (the same
    numbers), much slower: the operator who asked for one is told, once, at load."""

    class Kernel:
        def has_avx512(self):
            return avx512

        def int8_path(self):
            return int8_path

    monkeypatch.setattr(cpu_linear.block_linear, "load_kernel", Kernel)
    with caplog.at_level("WARNING", logger="splitserve"):
        assert cpu_linear.use_blocks(backend, torch.device("cpu"), torch.float32)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    if warned is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and warned in warnings[0]
