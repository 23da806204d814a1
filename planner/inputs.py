"""What `splitserve plan` is given, checked and resolved: counts (`4k`), dtype names, a GPU
name, and a model as a built-in name, a config.json, a Hugging Face folder or a GGUF file.
Bad input is a ValueError with a one-line message. No torch unless a file must be read."""

from __future__ import annotations

import json
import os
from typing import Any

from splitserve.planner.architecture import Architecture
from splitserve.planner.data import BUILTIN_MODELS, GPU, GPUS

DTYPE_ALIASES = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def parse_count(value: str | int, what: str) -> int:
    """A positive integer, also written with a K suffix (``4k`` = 4096)."""
    if isinstance(value, int):
        n = value
    else:
        text = str(value).strip().lower().replace("_", "")
        scale = 1024 if text.endswith("k") else 1
        try:
            n = int(text[:-1] if scale > 1 else text) * scale
        except ValueError:
            raise ValueError(f"{what} must be a positive integer, got {value!r}") from None
    if n < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return n


def get_gpu(name: str) -> GPU:
    gpu = GPUS.get(name.strip().lower())
    if gpu is None:
        raise ValueError(f"unknown GPU {name!r}; choose one of {', '.join(GPUS)}")
    return gpu


def parse_dtype(name: str, allowed: Any, what: str) -> str:
    """The short name (fp16, bf16, ...) of `name`, which must be one of `allowed`."""
    key = name.strip().lower()
    key = DTYPE_ALIASES.get(key, key)
    if key not in allowed:
        raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(allowed)}")
    return key


def resolve_model(spec: str) -> Architecture:
    """A built-in name, a config.json file, a Hugging Face folder or a GGUF file."""
    key = spec.strip().lower()
    if key in BUILTIN_MODELS:
        return BUILTIN_MODELS[key]
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        config_json = os.path.join(path, "config.json")
        if not os.path.isfile(config_json):
            raise ValueError(f"{path} is a folder without config.json, not a model folder")
        # The config alone: planning needs no weights (and they may not be downloaded yet).
        name = os.path.basename(os.path.normpath(path))
        return _from_hf_dict(_read_json(config_json), name, config_json)
    if os.path.isfile(path):
        with open(path, "rb") as f:
            head = f.read(4)
        if head == b"GGUF":
            from splitserve.model.loader import open_checkpoint  # torch, only now

            # Reads the metadata only; `.tensors()` (the weights) is never called.
            return Architecture.from_model_config(open_checkpoint(path).config)
        name = os.path.basename(os.path.dirname(os.path.abspath(path))) or "model"
        return _from_hf_dict(_read_json(path), name, path)
    if os.sep in spec or spec.endswith((".json", ".gguf")) or spec.startswith("~"):
        raise ValueError(f"no such model file or folder: {path}")
    raise ValueError(
        f"unknown model {spec!r}; built-in names: {', '.join(BUILTIN_MODELS)}; "
        "or pass a config.json, a GGUF file or a Hugging Face folder"
    )


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable config.json ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _from_hf_dict(cfg: dict[str, Any], name: str, path: str) -> Architecture:
    from splitserve.engine.config import ModelConfig  # torch, only now

    try:
        model_config = ModelConfig.from_hf(cfg, name=name)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: unsupported or incomplete config ({e!s})") from e
    return Architecture.from_model_config(model_config)
