"""AWQ and GPTQ checkpoints: the packed layouts, the converter that writes them and the loader.

The layouts are checked nibble by nibble against the published orders; a converted tiny model
must load back to exactly the converter's rounded weights, run in int4 under
`--quantization auto`, and broken files must fail with a one-line error naming the tensor.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from splitserve.engine.config import EngineConfig, ModelLoadError
from splitserve.engine.sampling_params import SamplingParams
from splitserve.executors.build import create_engine
from splitserve.model import int4_formats as f4
from splitserve.model import quant_convert
from splitserve.model.loader import open_checkpoint
from splitserve.model.quant_linear import Int4Linear


def test_awq_packs_eight_output_channels_in_its_interleaved_order():
    q = torch.arange(8).repeat(2, 1).t().contiguous()  # (N=8, K=2): channel c holds code c
    z = torch.zeros(8, 1, dtype=torch.int64)
    s = torch.ones(8, 1, dtype=torch.float16)
    qweight, qzeros, scales = f4.pack_awq(q, z, s)
    assert qweight.shape == (2, 1) and qzeros.shape == (1, 1) and scales.shape == (1, 8)
    # nibble i holds channel (0, 2, 4, 6, 1, 3, 5, 7)[i]
    assert int(qweight[0, 0]) & 0xFFFFFFFF == 0x75316420
    w = f4.dequantize_awq("layer", qweight, qzeros, scales, group_size=2)
    assert torch.equal(w, q.float())


def test_gptq_packs_eight_input_rows_and_stores_zero_minus_one():
    q = torch.arange(8).repeat(8, 1)  # (N=8, K=8): input k holds code k
    z = torch.tensor([[8], [1], [0], [8], [8], [8], [8], [8]])
    s = torch.tensor([[1.0], [0.5], [2.0], [1], [1], [1], [1], [1]], dtype=torch.float16)
    qweight, qzeros, scales, g_idx = f4.pack_gptq(q, z, s, group_size=8)
    assert qweight.shape == (1, 8) and qzeros.shape == (1, 1) and g_idx.tolist() == [0] * 8
    assert int(qweight[0, 0]) & 0xFFFFFFFF == 0x76543210
    # v1: z - 1, channels in plain order: 7, 0, 15 (0 - 1 wraps), 7, ...
    assert int(qzeros[0, 0]) & 0xFFFFFFFF == 0x77777F07
    w = f4.dequantize_gptq("layer", qweight, qzeros, scales, g_idx)
    want = (q - z).float() * s.float()
    assert torch.equal(w, want)


def test_dequantize_names_the_tensor_with_a_bad_shape_or_dtype():
    q = torch.zeros(16, 64, dtype=torch.int64)
    z = torch.zeros(16, 2, dtype=torch.int64)
    s = torch.ones(16, 2, dtype=torch.float16)
    qweight, qzeros, scales = f4.pack_awq(q, z, s)
    with pytest.raises(ModelLoadError, match=r"^model.x.scales: shape \(2, 8\), expected"):
        f4.dequantize_awq("model.x", qweight, qzeros, scales[:, :8], 32)
    with pytest.raises(ModelLoadError, match=r"model\.x\.qzeros: expected int32"):
        f4.dequantize_awq("model.x", qweight, qzeros.float(), scales, 32)
    with pytest.raises(ModelLoadError, match=r"model\.x\.qweight: 64 inputs are not a multiple"):
        f4.dequantize_awq("model.x", qweight, qzeros, scales, 48)


@pytest.fixture(scope="module")
def converted(tiny_model_dir, tmp_path_factory):
    """The tiny checkpoint as AWQ and GPTQ folders, with the converter's rounded weights."""
    out = {}
    for fmt in ("awq", "gptq"):
        ref: dict[str, torch.Tensor] = {}
        path = str(tmp_path_factory.mktemp(fmt))
        quant_convert.convert(tiny_model_dir, path, fmt, group_size=32, reference=ref)
        out[fmt] = (path, ref)
    return out


@pytest.mark.parametrize("fmt", ["awq", "gptq"])
def test_loader_reads_back_exactly_what_the_converter_rounded(converted, fmt):
    path, ref = converted[fmt]
    with open(os.path.join(path, "config.json")) as fh:
        qc = json.load(fh)["quantization_config"]
    assert qc["quant_method"] == fmt and qc["bits"] == 4 and qc["group_size"] == 32
    stored = load_file(os.path.join(path, "model.safetensors"))
    layer = "model.layers.0.self_attn.q_proj"
    assert stored[f"{layer}.qweight"].dtype == torch.int32
    assert stored[f"{layer}.scales"].dtype == torch.float16
    assert (f"{layer}.g_idx" in stored) == (fmt == "gptq")
    ckpt = open_checkpoint(path)
    assert ckpt.quantization == ("int4", 32)
    loaded = dict(ckpt.tensors())
    assert set(ref) <= set(loaded) and len(ref) == 7 * ckpt.config.num_layers
    for name, want in ref.items():
        assert torch.equal(loaded[name], want), name
    # and through the refs a model shard reads from
    refs = dict(ckpt.refs())
    assert torch.equal(refs[f"{layer}.weight"].read((0, 8), None), ref[f"{layer}.weight"][:8])


def test_converted_model_generates_in_int4(converted, tiny_model_dir):
    path, _ = converted["awq"]
    engine = create_engine(EngineConfig(num_kv_blocks=32, model=path))  # quantization auto
    assert engine.config.quantization == "int4" and engine.config.quantization_group_size == 32
    linears = engine.runner.executor.shard.model.layers[0].mlp.down_proj
    assert isinstance(linears, Int4Linear)
    ids = engine.tokenizer.encode("Hello there")
    engine.add_request("r", ids, SamplingParams(max_tokens=5, min_tokens=5, temperature=0))
    out: list[int] = []
    while engine.has_unfinished_requests():
        for o in engine.step():
            out += o.new_token_ids
    assert len(out) == 5


def test_corrupt_awq_tensor_is_a_one_line_error_naming_it(converted, tmp_path):
    path, _ = converted["awq"]
    tensors = load_file(os.path.join(path, "model.safetensors"))
    bad = "model.layers.1.mlp.up_proj.qzeros"
    tensors[bad] = tensors[bad][:, :1].contiguous()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(path, name), "rb") as src, open(tmp_path / name, "wb") as dst:
            dst.write(src.read())
    save_file(tensors, str(tmp_path / "model.safetensors"))
    ckpt = open_checkpoint(str(tmp_path))
    with pytest.raises(ModelLoadError, match=rf"^{bad}: shape \(\d+, 1\), expected") as err:
        dict(ckpt.tensors())
    assert "\n" not in str(err.value)
    del tensors["model.layers.0.self_attn.k_proj.scales"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"k_proj\.scales is missing"):
        open_checkpoint(str(tmp_path))


def test_unsupported_quantization_config_is_refused(converted, tmp_path):
    path, _ = converted["gptq"]
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        os.symlink(os.path.join(path, name), tmp_path / name)
    with open(os.path.join(path, "config.json")) as fh:
        cfg = json.load(fh)
    cfg["quantization_config"]["bits"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="3-bit gptq is unsupported; only 4-bit"):
        open_checkpoint(str(tmp_path))
