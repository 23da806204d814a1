"""Hugging Face folders: `config.json` + `model.safetensors` (or shards + index), tokenizer files.

Tensors are read one at a time through `safetensors.safe_open`, which memory-maps each file, so
loading never holds more than the tensor in hand beyond the model. They keep the dtype they are
stored in; the model casts on copy.
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
from splitserve.model.loader import Checkpoint, ModelLoadError, Region, TensorRef

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
