"""Hugging Face folders: `config.json` + `model.safetensors` (or shards + index), tokenizer files.

Tensors are read one at a time through `safetensors.safe_open`, which memory-maps each file, so
loading never holds more than the tensor in hand beyond the model. They keep the dtype they are
stored in; the model casts on copy.

AWQ and GPTQ folders (`quantization_config` with quant_method awq / gptq, 4 bits) are read too:
each linear's `qweight/qzeros/scales[/g_idx]` is one `prefix.weight` here, dequantized exactly
to float32 when reached (model/int4_formats.py), and the checkpoint says it is int4 with its
group size, so `--quantization auto` serves it in int4 (model/quant_linear.py).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from splitserve.engine.config import ModelConfig
from splitserve.engine.tokenizer import Tokenizer
from splitserve.model import int4_formats
from splitserve.model.loader import Checkpoint, ModelLoadError, Region, TensorRef, cut

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def open_hf_folder(path: str) -> Checkpoint:
    hf_config = _read_json(os.path.join(path, "config.json"))
    try:
        config = ModelConfig.from_hf(hf_config, name=os.path.basename(os.path.normpath(path)))
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{path}/config.json: unsupported or incomplete config ({e})") from e
    files = _tensor_files(path)
    tokenizer = Tokenizer.from_hf_folder(path)
    int4 = _int4_format(hf_config, path)
    if int4 is not None:
        return _open_int4(path, config, tokenizer, files, int4)

    def source(names: set[str] | None) -> Iterator[tuple[str, torch.Tensor]]:
        for file, tensor_names in files.items():
            wanted = [n for n in tensor_names if names is None or n in names]
            if wanted:
                yield from _read_tensors(os.path.join(path, file), wanted)

    def refs() -> Iterator[tuple[str, TensorRef]]:
        for file, tensor_names in files.items():
            full = os.path.join(path, file)
            shapes = _shapes(full, tensor_names)
            for name in tensor_names:
                reader = functools.partial(_read_region, full, name)
                yield name, TensorRef(shapes[name], reader)

    num = sum(len(v) for v in files.values())
    return Checkpoint(path, config, tokenizer, num, source, refs)


def _tensor_files(path: str) -> dict[str, list[str]]:
    """`{file: [tensor names in it]}` for a single-file or sharded checkpoint."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index}: no weight_map")
        files: dict[str, list[str]] = {}
        for name, file in sorted(weight_map.items()):
            files.setdefault(file, []).append(name)
        for file in files:
            if not os.path.isfile(os.path.join(path, file)):
                raise ModelLoadError(f"{path}: shard {file} named by {INDEX_FILE} is missing")
        return files
    single = os.path.join(path, SINGLE_FILE)
    if not os.path.isfile(single):
        raise ModelLoadError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")
    try:
        with safe_open(single, framework="pt") as f:
            return {SINGLE_FILE: sorted(f.keys())}
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"{single}: unreadable safetensors file ({e})") from e


def _read_tensors(file: str, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        with safe_open(file, framework="pt") as f:
            for name in names:
                yield name, f.get_tensor(name)
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"{file}: unreadable safetensors file ({e})") from e


def _shapes(file: str, names: list[str]) -> dict[str, tuple[int, ...]]:
    try:
        with safe_open(file, framework="pt") as f:
            return {n: tuple(f.get_slice(n).get_shape()) for n in names}
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"{file}: unreadable safetensors file ({e})") from e


def _read_region(file: str, name: str, rows: Region, cols: Region) -> torch.Tensor:
    """Only the (rows, cols) part of one tensor: safetensors reads just those bytes."""
    try:
        with safe_open(file, framework="pt") as f:
            part = f.get_slice(name)
            if rows is None and cols is None:
                return part[:]
            r = slice(*rows) if rows is not None else slice(None)
            c = slice(*cols) if cols is not None else slice(None)
            return part[r, c]
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"{file}: unreadable safetensors file ({e})") from e


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: unreadable JSON ({e})") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


# ---- AWQ / GPTQ -----------------------------------------------------------------------------
INT4_PARTS = {
    "awq": ("qweight", "qzeros", "scales"),
    "gptq": ("qweight", "qzeros", "scales", "g_idx"),
}
SERVING_GROUPS = (32, 64, 128, 256)  # what the int4 kernel takes (model/quant_linear.py)


def _int4_format(hf_config: dict[str, Any], path: str) -> tuple[str, int, bool] | None:
    """(method, group size, GPTQ v1 zeros) from config.json's quantization_config, or None."""
    qc = hf_config.get("quantization_config")
    if not qc:
        return None
    where = f"{path}/config.json quantization_config"
    method = qc.get("quant_method")
    if method not in INT4_PARTS:
        raise ModelLoadError(f"{where}: quant_method {method!r} is unsupported (awq, gptq)")
    bits = qc.get("bits", qc.get("w_bit"))
    if bits != 4:
        raise ModelLoadError(f"{where}: {bits}-bit {method} is unsupported; only 4-bit")
    group = qc.get("group_size", qc.get("q_group_size"))
    if not isinstance(group, int) or (group <= 0 and not (method == "gptq" and group == -1)):
        raise ModelLoadError(f"{where}: group_size {group!r} is not a positive integer")
    v1 = True
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm" or qc.get("zero_point") is False:
            raise ModelLoadError(f"{where}: AWQ version {version!r} is unsupported (gemm)")
    else:
        fmt = qc.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise ModelLoadError(f"{where}: checkpoint_format {fmt!r} is unsupported")
        v1 = fmt == "gptq"
    return method, group, v1


def _open_int4(path, config, tokenizer, files, int4) -> Checkpoint:
    method, group, v1 = int4
    file_of = {name: file for file, names in files.items() for name in names}
    parts = INT4_PARTS[method]
    plain: list[str] = []
    packed: dict[str, dict[str, str]] = {}  # "prefix.weight" -> {part: file}
    for name in file_of:
        prefix, _, part = name.rpartition(".")
        if part in parts:
            packed.setdefault(f"{prefix}.weight", {})[part] = file_of[name]
        else:
            plain.append(name)
    for weight, found in packed.items():
        missing = [p for p in parts if p not in found]
        if missing:
            prefix = weight.removesuffix(".weight")
            raise ModelLoadError(f"{path}: {prefix}.{missing[0]} is missing ({method} linear)")

    def read_int4(weight: str) -> torch.Tensor:
        prefix = weight.removesuffix(".weight")
        t = {
            p: _read_one(os.path.join(path, f), f"{prefix}.{p}") for p, f in packed[weight].items()
        }
        if method == "awq":
            return int4_formats.dequantize_awq(
                prefix, t["qweight"], t["qzeros"], t["scales"], group
            )
        return int4_formats.dequantize_gptq(
            prefix, t["qweight"], t["qzeros"], t["scales"], t["g_idx"], v1
        )

    def read_any(name: str) -> torch.Tensor:
        if name in packed:
            return read_int4(name)
        return _read_one(os.path.join(path, file_of[name]), name)

    names = sorted(plain) + sorted(packed)

    def source(wanted: set[str] | None) -> Iterator[tuple[str, torch.Tensor]]:
        for name in names:
            if wanted is None or name in wanted:
                yield name, read_any(name)

    def refs() -> Iterator[tuple[str, TensorRef]]:
        for name in names:
            tensor = read_any(name) if name in packed else None
            if tensor is None:
                shape = _shapes(os.path.join(path, file_of[name]), [name])[name]
                reader = functools.partial(_read_region, os.path.join(path, file_of[name]), name)
            else:
                shape = tuple(tensor.shape)
                reader = functools.partial(lambda t, rows, cols: cut(t, rows, cols), tensor)
            yield name, TensorRef(shape, reader)

    serving = group if group in SERVING_GROUPS else min(SERVING_GROUPS)
    return Checkpoint(path, config, tokenizer, len(names), source, refs, ("int4", serving))


def _read_one(file: str, name: str) -> torch.Tensor:
    return next(_read_tensors(file, [name]))[1]
