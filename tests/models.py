"""The tests' model configs, each spelled out once.

A random-weight engine (`LLMEngine.random`) draws its weights from the engine's seed and the
config's shapes, so a config is part of what a test expects: each one here keeps the numbers
its tests were written against, and a test that needs another shape derives it from one of
these (`tiny(vocab_size=96, ...)`) instead of writing a new config out.

- `TINY_HF` / `tiny()`: the smallest Llama (2 layers, hidden 32, vocab 128) as a Hugging Face
  config.json dict and as our `ModelConfig`; the engine, worker and kernel unit tests.
- `TIED_TINY`: a tied head over vocab 96; the CPU kernel tests.
- `LAYOUT_TINY`: 4 layers with 2 KV heads, for the TP/PP layouts to split; `LAYOUT_ENGINE`:
  the engine settings its layout tests run under (a pool and token budget that force chunking
  and preemption).
- `VARIANT_BASE`: config.json fields that the transformers-equivalence suites (engine, TP)
  complete with a variant's architecture fields.
- `CHECKPOINT_TINY_HF`: the random Llama that `tiny_model_dir` saves with SmolLM2's tokenizer,
  loaded by whole services in seconds.
- `SMOLLM2`: SmolLM2-135M's shapes (widths, heads, layers, vocab, tied head), for layout
  arithmetic without loading it.
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.config import ModelConfig

TINY_HF: dict[str, Any] = dict(
    model_type="llama",
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    eos_token_id=2,
)


def tiny_hf(**fields: Any) -> dict[str, Any]:
    """`TINY_HF` with some fields changed."""
    return {**TINY_HF, **fields}


def tiny(name: str = "tiny", **fields: Any) -> ModelConfig:
    """`tiny_hf(**fields)` as a `ModelConfig`."""
    return ModelConfig.from_hf(tiny_hf(**fields), name=name)


TINY = tiny()
TIED_TINY = tiny(
    vocab_size=96, max_position_embeddings=64, tie_word_embeddings=True, eos_token_id=None
)
LAYOUT_TINY = tiny(
    vocab_size=301,  # odd: a vocabulary that does not split evenly
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    rms_norm_eps=1e-5,
    eos_token_id=None,
)
# EngineConfig fields for LAYOUT_TINY's layout tests. Small token budget: long prompts are
# prefilled in chunks next to running decodes. Small pool: the batch doesn't fit, so the newest
# requests are preempted and recomputed.
LAYOUT_ENGINE: dict[str, Any] = dict(
    num_kv_blocks=24,
    block_size=4,
    max_num_batched_tokens=24,
    attention_backend="torch",
    seed=5,
    num_threads=1,
)

VARIANT_BASE: dict[str, Any] = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    max_position_embeddings=256,
    eos_token_id=2,
    bos_token_id=1,
)

# A small random Llama over SmolLM2's real tokenizer (vocab_size, bos and eos come from it).
CHECKPOINT_TINY_HF: dict[str, Any] = dict(
    model_type="llama",
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
    # Wider weights than the default 0.02 spread the logits out, so greedy choices are never
    # near-ties that summation order (TP all-reduces) could flip.
    initializer_range=0.2,
)

SMOLLM2 = ModelConfig(
    architecture="llama",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=1e4,
    tie_word_embeddings=True,
)
