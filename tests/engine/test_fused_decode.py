"""The fused decoder loop (model/fused_decode.py) on the real SmolLM2 weights: it computes what
the modules compute, is used exactly where promised, and the int8 engine built on it stays
close to transformers' answers."""

from __future__ import annotations

import ctypes
import functools

import pytest
import torch
from test_engine_smollm2 import PARAMS, engine_for

from splitserve.bench.quant_quality import same_prefix
from splitserve.model.attention import AttentionMetadata
from splitserve.model.fused_decode import MAX_TOKENS, FusedDecoder
from splitserve.model.kv_quant import QUANTS

pytestmark = pytest.mark.slow


def run(model, ids, positions, kv, meta, backend, fused):
    saved, model.fused = model.fused, fused
    try:
        with torch.inference_mode():
            return model(ids, positions, kv, meta, backend)
    finally:
        model.fused = saved


def test_the_loop_computes_what_the_modules_compute(smollm2_checkpoint):
    # With float32 blocks in it (int8_only=False) the loop and the modules differ only in the
    # order of float operations: a prefill chunk, then a batch of decodes over it.
    shard = engine_for(smollm2_checkpoint, linear_backend="blocks").runner.executor.shard
    model = shard.model
    assert model.fused is None and FusedDecoder.build(model) is None  # float blocks: not used
    loop = FusedDecoder.build(model, int8_only=False)
    assert loop is not None and len(loop.layers) == 30
    bs = shard.block_size
    caches = [torch.zeros_like(shard.kv_cache) for _ in range(2)]
    prompt = torch.randint(0, 49152, (20,), generator=torch.Generator().manual_seed(0))
    pre = AttentionMetadata.build(bs, [[1, 2]], [0], [20])
    outs = [run(model, prompt, torch.arange(20), kv, pre, shard.backend, f) for kv, f in
            zip(caches, (loop, None), strict=True)]  # fmt: skip
    scale = outs[1].abs().max().item()
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5 * scale, rtol=1e-5)
    torch.testing.assert_close(caches[0], caches[1], atol=1e-4, rtol=1e-4)
    # a batch of three decodes: two over the prompt's blocks (at positions 20 and 17; the
    # second overwrites the prompt's K/V at 17 in both caches alike), one on a fresh block
    dec = AttentionMetadata.build(bs, [[1, 2], [1, 2], [4]], [20, 17, 0], [1, 1, 1])
    ids, pos = torch.tensor([5, 77, 9]), torch.tensor([20, 17, 0])
    outs = [run(model, ids, pos, kv, dec, shard.backend, f) for kv, f in
            zip(caches, (loop, None), strict=True)]  # fmt: skip
    scale = outs[1].abs().max().item()
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5 * scale, rtol=1e-5)


def test_int8_engine_uses_the_loop_and_stays_near_the_reference(
    smollm2_checkpoint, engine_prompts, engine_references
):
    engine = engine_for(smollm2_checkpoint, linear_backend="blocks-int8")
    shard = engine.runner.executor.shard
    assert shard.linears == (
        "121 linears and 1 embedding in Q4_1/Q8_0 blocks (int8 activations), 0 packed for "
        f"oneDNN; steps of <= {MAX_TOKENS} tokens in one fused loop"
    )
    assert shard.model.fused is not None
    outs = engine.generate(engine_prompts, PARAMS)
    # Not float32-exact: rounded activations move the logits a little, and near ties go either
    # way. llama.cpp's llama-server on the same file (its own int8 activations) keeps
    # transformers' greedy tokens for [0, 1, 10, 15, 1, 0, 31, 37] of these prompts' 64 (95 of
    # 512) before its first different token; this engine kept [0, 0, 10, 64, 1, 0, 39, 1] (115).
    agree, diffs = [], []
    for out, (tokens, logprobs) in zip(outs, engine_references, strict=True):
        agree.append(same_prefix(out.new_token_ids, tokens))
        pairs = zip(out.new_logprobs[: agree[-1]], logprobs[: agree[-1]], strict=True)
        diffs += [abs(a - b) for a, b in pairs]
    assert sum(agree) >= 80, agree
    assert sum(a >= 10 for a in agree) >= 3, agree
    assert sum(diffs) / len(diffs) < 0.1  # the chosen tokens' logprobs, where both chose them


def assert_same_decode_steps(shard, seed, native, plain, plain_backend=None):
    """A 20-token prefill into two zeroed pools, then two steps of three decodes (the second
    reads what the first wrote; one overwrites a prompt slot): `native` on the shard's backend
    and `plain` on `plain_backend` must give equal outputs and equal pools."""
    model, bs = shard.model, shard.block_size
    caches = [torch.zeros_like(shard.kv_cache) for _ in range(2)]
    prompt = torch.randint(0, 49152, (20,), generator=torch.Generator().manual_seed(seed))
    pre = AttentionMetadata.build(bs, [[1, 2]], [0], [20])
    for kv in caches:
        run(model, prompt, torch.arange(20), kv, pre, shard.backend, None)
    ids, pos = torch.tensor([5, 77, 9]), torch.tensor([20, 17, 0])
    for _ in range(2):
        dec = AttentionMetadata.build(bs, [[1, 2], [1, 2], [4]], pos.tolist(), [1, 1, 1])
        got = run(model, ids, pos, caches[0], dec, shard.backend, native)
        want = run(model, ids, pos, caches[1], dec, plain_backend or shard.backend, plain)
        assert torch.equal(got, want)
        assert torch.equal(caches[0], caches[1])
        pos = pos + 1


@pytest.mark.parametrize("linear_backend", ["blocks-int8", "blocks"])
def test_the_native_stack_is_the_loop_bit_for_bit(smollm2_checkpoint, linear_backend):
    # block_linear.cpp's DecoderStack runs a decode-only step's 30 layers in one C++ call: the
    # same kernels with the same arguments in the same order as the Python loop, so outputs
    # and the pool's new K/V are equal, not just close.
    shard = engine_for(smollm2_checkpoint, linear_backend=linear_backend).runner.executor.shard
    native = FusedDecoder.build(shard.model, int8_only=linear_backend == "blocks-int8")
    plain = FusedDecoder.build(shard.model, int8_only=linear_backend == "blocks-int8")
    assert native.stack is not None
    plain.stack = None
    assert_same_decode_steps(shard, 1, native, plain)


def test_the_native_stack_refuses_a_foreign_capsule(smollm2_checkpoint):
    shard = engine_for(smollm2_checkpoint, linear_backend="blocks-int8").runner.executor.shard
    loop = shard.model.fused
    assert loop.stack is not None  # the int8 engine runs its decode steps through it
    layer = loop.layers[0]
    mats = (layer[1], layer[2], *layer[4:])
    args = [[layer[0]], [layer[3]], *([m[1][j] for m in mats] for j in range(3))]
    args += [True, loop.num_q, loop.num_kv, loop.head_dim, loop.eps, loop.scale]
    new = ctypes.pythonapi.PyCapsule_New
    new.restype = ctypes.py_object
    new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    name = b"somebody.else"  # a capsule with another name: its pointer is never called
    with pytest.raises(RuntimeError, match="attention capsule"):
        loop.kernel.DecoderStack(*args, new(1, name, None))
    with pytest.raises(TypeError):  # not a capsule at all
        loop.kernel.DecoderStack(*args, "paged_decode_attention_writing")


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8_e4m3"])
def test_the_native_stack_on_a_packed_pool_is_the_torch_path_bit_for_bit(
    smollm2_checkpoint, kv_cache_dtype
):
    # On an int8/fp8 pool the stack packs each decode token's K/V rows in C++; the pool and the
    # outputs must be exactly what the Python loop gives through the generic backend path
    # (KVQuant.quantize in torch, then the packed kernel).
    engine = engine_for(
        smollm2_checkpoint, linear_backend="blocks-int8", kv_cache_dtype=kv_cache_dtype
    )
    shard = engine.runner.executor.shard
    native = FusedDecoder.build(shard.model)
    plain = FusedDecoder.build(shard.model)
    plain.stack = None
    generic = functools.partial(shard.backend)  # the same attention, without decode_writing
    assert getattr(generic, "decode_writing", None) is None
    assert_same_decode_steps(shard, 2, native, plain, generic)
    assert native.packed_stacks[QUANTS[kv_cache_dtype].code] is not None  # the stack ran
