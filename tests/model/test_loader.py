"""Checkpoint loading: GGUF (real SmolLM2 and tiny synthetic files), HF folders, and errors."""

from __future__ import annotations

import json
import os

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize
from models import tiny_hf
from tiny_gguf import HEAD_DIM, HEADS, HIDDEN, KV_HEADS, write_tiny_gguf

from splitserve.engine.config import RopeScaling
from splitserve.model.gguf_loader import gguf_to_hf_name, permute_qk, unpermute_qk
from splitserve.model.loader import ModelLoadError, cut, default_model_path, open_checkpoint


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[str, dict]:
    path = str(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    return path, write_tiny_gguf(path)


# -- the real model ------------------------------------------------------------------------------


def test_default_model_path_exists(smollm2_path: str) -> None:
    assert default_model_path() == smollm2_path and os.path.isfile(smollm2_path)


@pytest.mark.slow
def test_smollm2_config(smollm2_checkpoint, hf_reference) -> None:
    cfg, ref = smollm2_checkpoint.config, hf_reference[0].config
    assert (cfg.architecture, cfg.hidden_size, cfg.num_layers) == ("llama", 576, 30)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (9, 3, 64)
    assert (cfg.vocab_size, cfg.intermediate_size, cfg.tie_word_embeddings) == (49152, 1536, True)
    assert cfg.rms_norm_eps == pytest.approx(ref.rms_norm_eps, rel=1e-6)
    assert cfg.rope_theta == 100000.0 and cfg.rope_scaling is None
    assert cfg.max_position_embeddings == ref.max_position_embeddings == 8192
    assert cfg.eos_token_ids == (2,) and cfg.bos_token_id == 1


@pytest.mark.slow
def test_smollm2_tensors_match_transformers(smollm2_checkpoint, hf_reference) -> None:
    state = hf_reference[0].state_dict()
    seen = set()
    for name, tensor in smollm2_checkpoint.tensors():
        ref = state[name]
        assert tensor.dtype == torch.float32 and tensor.shape == ref.shape, name
        # Not assert_close: it takes ~10 s over these 135M weights, this takes 0.2 s.
        assert (tensor - ref).abs().max().item() <= 1e-6, name
        seen.add(name)
    assert len(seen) == smollm2_checkpoint.num_tensors == 272
    assert seen == set(state) - {"lm_head.weight"}  # tied: the head is the embedding


def test_tensors_name_filter(smollm2_checkpoint) -> None:
    wanted = {"model.norm.weight", "model.layers.7.self_attn.k_proj.weight", "not.a.tensor"}
    got = dict(smollm2_checkpoint.tensors(wanted))
    assert set(got) == wanted - {"not.a.tensor"}
    assert got["model.layers.7.self_attn.k_proj.weight"].shape == (192, 576)


# -- tiny synthetic GGUFs -------------------------------------------------------------------------


def test_tiny_gguf_dequantizes_every_type(tiny_gguf) -> None:
    path, expected = tiny_gguf
    ckpt = open_checkpoint(path)
    cfg = ckpt.config
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (64, 2, 4, 2)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.tie_word_embeddings) == (256, 256, False)
    assert cfg.name == "tiny" and cfg.rms_norm_eps == 1e-5
    got = dict(ckpt.tensors())
    assert set(got) == set(expected) and ckpt.num_tensors == len(expected)
    for name, (want, tol) in expected.items():
        assert got[name].shape == want.shape, name
        torch.testing.assert_close(got[name], want, atol=tol, rtol=0, msg=name)


def test_tiny_gguf_matches_gguf_dequantize_exactly(tiny_gguf) -> None:
    path, _ = tiny_gguf
    ours = dict(open_checkpoint(path).tensors())
    for t in gguf.GGUFReader(path).tensors:
        ref = dequantize(np.asarray(t.data), t.tensor_type).reshape(tuple(reversed(t.shape)))
        ref = torch.from_numpy(np.array(ref, dtype=np.float32))
        n_head = {"attn_q": HEADS, "attn_k": KV_HEADS}.get(t.name.split(".")[-2], 0)
        if n_head:
            ref = unpermute_qk(ref, n_head)
        assert torch.equal(ours[gguf_to_hf_name(t.name)], ref), t.name


REGIONS = [
    (None, None),
    ((16, 48), None),  # rows on head boundaries (head_dim 16)
    (None, (32, 64)),  # columns on the 32-input block grid: only those blocks are read
    (None, (5, 37)),  # off the grid: rows dequantized, then cut
    ((0, 16), (0, 64)),
]


@pytest.mark.parametrize("rows,cols", REGIONS)
def test_tiny_gguf_regions_equal_the_cut_of_the_whole(tiny_gguf, rows, cols) -> None:
    # Every type (F32, F16, Q8_0, Q4_0/1, Q5_x, K-quants) and the un-permuted q/k rows.
    path, _ = tiny_gguf
    ckpt = open_checkpoint(path)
    whole = dict(ckpt.tensors())
    refs = dict(ckpt.refs())
    assert set(refs) == set(whole)
    for name, ref in refs.items():
        assert ref.shape == tuple(whole[name].shape), name
        if len(ref.shape) == 1:
            assert torch.equal(ref.read(), whole[name]), name
            continue
        assert torch.equal(ref.read(rows, cols), cut(whole[name], rows, cols)), name


def test_a_tensor_parallel_shard_reads_only_its_part(tiny_gguf, monkeypatch) -> None:
    # Rank 1 of 2 loads through refs; every read it makes is smaller than the tensor, and
    # what it loads equals rank 1 cut from the whole tensors.
    from splitserve.model import gguf_loader
    from splitserve.model.llama import LlamaModel
    from splitserve.model.parallel import ShardSpec

    path, _ = tiny_gguf
    ckpt = open_checkpoint(path)
    reads: list[tuple[str, int, int]] = []
    real = gguf_loader._read_region

    def spy(tensor, hf_name, config, rows, cols):
        out = real(tensor, hf_name, config, rows, cols)
        full = int(np.prod(tensor.shape.tolist()))
        reads.append((hf_name, out.numel(), full))
        return out

    monkeypatch.setattr(gguf_loader, "_read_region", spy)
    spec = ShardSpec(tp_rank=1, tp_size=2)
    lazy = LlamaModel(ckpt.config, max_positions=8, shard=spec)
    assert lazy.load_weights(ckpt.refs()) == lazy.expected_weights()
    eager = LlamaModel(ckpt.config, max_positions=8, shard=spec)
    eager.load_weights(ckpt.tensors())
    for (name, a), b in zip(lazy.state_dict().items(), eager.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    matrices = [(n, got, full) for n, got, full in reads if ".norm" not in n and "norm." not in n]
    assert matrices and all(got * 2 == full for _, got, full in matrices), matrices


def test_a_pipeline_stage_reads_nothing_of_other_stages(tiny_gguf, monkeypatch) -> None:
    from splitserve.model import gguf_loader
    from splitserve.model.llama import LlamaModel
    from splitserve.model.parallel import ShardSpec

    path, _ = tiny_gguf
    ckpt = open_checkpoint(path)
    read: list[str] = []
    real = gguf_loader._read_region
    monkeypatch.setattr(
        gguf_loader,
        "_read_region",
        lambda t, name, *a: read.append(name) or real(t, name, *a),
    )
    stage = LlamaModel(ckpt.config, max_positions=8, shard=ShardSpec(first_layer=1))
    stage.load_weights(ckpt.refs())
    assert read and all(n.startswith("model.layers.1.") or "layers" not in n for n in read)
    assert "model.embed_tokens.weight" not in read  # the head is untied here


def test_permutation_roundtrip_matches_llama_cpp() -> None:
    w = torch.randn(KV_HEADS * HEAD_DIM, HIDDEN)
    # convert_hf_to_gguf.py's LlamaModel.permute, verbatim in numpy.
    n = w.numpy()
    llama_cpp = n.reshape(KV_HEADS, 2, n.shape[0] // KV_HEADS // 2, *n.shape[1:]).swapaxes(1, 2)
    assert np.array_equal(permute_qk(w, KV_HEADS).numpy(), llama_cpp.reshape(n.shape))
    assert torch.equal(unpermute_qk(permute_qk(w, KV_HEADS), KV_HEADS), w)
    assert not torch.equal(permute_qk(w, KV_HEADS), w)


def test_qwen2_gguf_keeps_row_order_and_biases(tmp_path) -> None:
    path = str(tmp_path / "qwen.gguf")
    expected = write_tiny_gguf(path, arch="qwen2")
    ckpt = open_checkpoint(path)
    assert ckpt.config.architecture == "qwen2" and ckpt.config.attention_bias
    got = dict(ckpt.tensors())
    assert "model.layers.1.self_attn.k_proj.bias" in got
    q = "model.layers.0.self_attn.q_proj.weight"  # stored F32 and never permuted for qwen2
    assert torch.equal(got[q], expected[q][0])


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path) -> None:
    # convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors for Llama 3.1 (factor 8).
    factor, low, high, old_ctx = 8.0, 1.0, 4.0, 8192
    divisors = []
    for freq in 1.0 / 10000.0 ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM):
        wavelen = 2 * np.pi / freq
        if wavelen < old_ctx / high:
            divisors.append(1.0)
        elif wavelen > old_ctx / low:
            divisors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    path = str(tmp_path / "llama31.gguf")
    write_tiny_gguf(path, rope_freqs=np.array(divisors))
    ckpt = open_checkpoint(path)
    assert ckpt.config.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    assert "rope_freqs.weight" not in dict(ckpt.tensors())


# -- errors ---------------------------------------------------------------------------------------


def _load_error(path: str) -> str:
    with pytest.raises(ModelLoadError) as info:
        open_checkpoint(path)
    message = str(info.value)
    assert message and "\n" not in message
    return message


def test_missing_path(tmp_path) -> None:
    assert "no such" in _load_error(str(tmp_path / "nope.gguf"))


def test_random_bytes_gguf(tmp_path) -> None:
    path = tmp_path / "random.gguf"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert "GGUF" in _load_error(str(path))
    path.write_bytes(b"GGUF" + np.random.default_rng(2).bytes(4096))  # right magic, garbage after
    assert "GGUF" in _load_error(str(path))


@pytest.mark.parametrize("keep", [0.3, 0.97])
def test_truncated_gguf(tiny_gguf, tmp_path, keep: float) -> None:
    with open(tiny_gguf[0], "rb") as f:
        data = f.read()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: int(len(data) * keep)])
    _load_error(str(path))


def test_folder_without_config(tmp_path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert "config.json" in _load_error(str(tmp_path))


def test_unsupported_quant_type(tmp_path) -> None:
    path = str(tmp_path / "iq.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    type_size = gguf.GGML_QUANT_SIZES[Q.IQ4_NL][1]
    writer.add_tensor(
        "token_embd.weight", np.zeros((4, 2 * type_size), np.uint8), raw_dtype=Q.IQ4_NL
    )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert "IQ4_NL" in _load_error(path)


def test_unsupported_architecture(tmp_path) -> None:
    path = str(tmp_path / "phi.gguf")
    writer = gguf.GGUFWriter(path, "phi3")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert "phi3" in _load_error(path)


# -- Hugging Face folders -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import AutoConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        **tiny_hf(
            hidden_size=64, intermediate_size=128, rms_norm_eps=1e-5, rope_theta=50000.0,
            tie_word_embeddings=False, bos_token_id=1,
        )
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("shard", [None, "50KB"])
def test_hf_folder_matches_state_dict(tiny_llama, tmp_path, shard: str | None) -> None:
    kwargs = {"max_shard_size": shard} if shard else {}
    tiny_llama.save_pretrained(tmp_path, **kwargs)
    if shard:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
    ckpt = open_checkpoint(str(tmp_path))
    state = tiny_llama.state_dict()
    got = dict(ckpt.tensors())
    assert set(got) == set(state) and ckpt.num_tensors == len(state)
    for name, tensor in got.items():
        assert torch.equal(tensor, state[name]), name
    cfg = ckpt.config
    assert (cfg.architecture, cfg.hidden_size, cfg.num_layers, cfg.vocab_size) == (
        "llama",
        64,
        2,
        128,
    )
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size) == (4, 2, 16, 128)
    assert cfg.rope_theta == 50000.0 and cfg.rms_norm_eps == 1e-5 and not cfg.tie_word_embeddings
    assert cfg.eos_token_ids == (2,) and ckpt.tokenizer is None
    only = dict(ckpt.tensors({"model.layers.1.mlp.down_proj.weight"}))
    assert list(only) == ["model.layers.1.mlp.down_proj.weight"]


def test_hf_folder_keeps_stored_dtype(tiny_llama, tmp_path) -> None:
    import copy

    copy.deepcopy(tiny_llama).to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="50KB")
    tensors = dict(open_checkpoint(str(tmp_path)).tensors())
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}


def test_hf_folder_missing_shard(tiny_llama, tmp_path) -> None:
    tiny_llama.save_pretrained(tmp_path, max_shard_size="50KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    os.remove(tmp_path / sorted(set(index["weight_map"].values()))[0])
    assert "missing" in _load_error(str(tmp_path))


def test_hf_folder_regions_read_only_the_part(tiny_llama, tmp_path) -> None:
    tiny_llama.save_pretrained(tmp_path, max_shard_size="50KB")
    ckpt = open_checkpoint(str(tmp_path))
    state = tiny_llama.state_dict()
    refs = dict(ckpt.refs())
    assert set(refs) == set(state)
    for name, ref in refs.items():
        assert ref.shape == tuple(state[name].shape)
        assert torch.equal(ref.read(), state[name])
        if len(ref.shape) == 2:
            assert torch.equal(ref.read((8, 24), (3, 40)), state[name][8:24, 3:40])
