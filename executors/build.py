"""Engines with a runner from this package: `create_engine` loads a checkpoint, and
`create_random_engine` gives random weights for tests of the engine's mechanics.

The engine core (splitserve.engine) is handed its runner and imports nothing above itself:
building one (loading weights, starting TP ranks or pipeline stages) happens here.
"""

from __future__ import annotations

import dataclasses

import torch

from splitserve.engine.config import EngineConfig, ModelConfig
from splitserve.engine.engine import LLMEngine
from splitserve.executors.runner import ModelRunner
from splitserve.model.loader import Checkpoint, open_checkpoint


def resolve_quantization(config: EngineConfig, ckpt: Checkpoint | None) -> EngineConfig:
    """`quantization="auto"` made concrete: the checkpoint's own low-precision form (an
    AWQ/GPTQ folder: int4 with its group size), else none."""
    if config.quantization != "auto":
        return config
    if ckpt is None or ckpt.quantization is None:
        return dataclasses.replace(config, quantization="none")
    method, group = ckpt.quantization
    return dataclasses.replace(config, quantization=method, quantization_group_size=group)


def create_engine(config: EngineConfig, checkpoint: Checkpoint | None = None) -> LLMEngine:
    """An engine for `config.model`, or for `checkpoint` when one is already open."""
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    ckpt = checkpoint or open_checkpoint(config.model)
    config = resolve_quantization(config, ckpt)
    runner = ModelRunner(ckpt.config, config, ckpt.refs(), ckpt.num_tensors)
    ckpt.drop_file_pages()
    return LLMEngine(config, ckpt.config, runner, ckpt.tokenizer, model_id=ckpt.config.name)


def create_random_engine(model_config: ModelConfig, config: EngineConfig) -> LLMEngine:
    """Random weights (seeded by `config.seed`) and no tokenizer."""
    return LLMEngine(config, model_config, ModelRunner(model_config, config, None))
