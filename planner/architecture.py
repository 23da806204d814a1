"""A model as the planner sees it: the shape numbers that decide its size, and its parameters
counted by where they live (embeddings, attention, MLP, norms, lm_head)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Architecture:
    """The numbers of a decoder-only Llama-family model that decide its size."""

    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # Qwen2: biases on q, k and v
    max_position_embeddings: int | None = None
    nominal: str = ""  # the size the model is known by, for the report
    repo: str = ""  # a built-in's Hugging Face repository, whose config.json these numbers are

    @classmethod
    def from_model_config(cls, cfg: Any, name: str | None = None) -> Architecture:
        """From an `engine.config.ModelConfig` (read by attribute, so no import of it here)."""
        return cls(
            name=name or cfg.name,
            num_layers=cfg.num_layers,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            vocab_size=cfg.vocab_size,
            tie_word_embeddings=cfg.tie_word_embeddings,
            attention_bias=cfg.attention_bias,
            max_position_embeddings=cfg.max_position_embeddings,
        )

    @property
    def key(self) -> str:
        """Where a built-in's numbers come from, as the plan prints it ("" for a file)."""
        return f"model.{self.name}" if self.repo else ""

    def same_shape(self, other: Architecture) -> bool:
        keys = ("name", "nominal", "max_position_embeddings", "repo")
        mine = {k: v for k, v in asdict(self).items() if k not in keys}
        return mine == {k: v for k, v in asdict(other).items() if k not in keys}


@dataclass(frozen=True)
class ParamCount:
    """Parameters by where they live; `layer` is one transformer block."""

    embeddings: int  # vocab x hidden
    lm_head: int  # vocab x hidden, 0 when tied to the embeddings
    attention_per_layer: int  # q, k, v, o (+ q/k/v biases)
    mlp_per_layer: int  # gate, up, down
    norms_per_layer: int  # two RMSNorm weights
    final_norm: int
    num_layers: int

    @property
    def per_layer(self) -> int:
        return self.attention_per_layer + self.mlp_per_layer + self.norms_per_layer

    @property
    def total(self) -> int:
        return self.embeddings + self.lm_head + self.num_layers * self.per_layer + self.final_norm


def count_params(a: Architecture) -> ParamCount:
    q_width = a.num_heads * a.head_dim
    kv_width = a.num_kv_heads * a.head_dim
    attention = a.hidden_size * q_width + 2 * a.hidden_size * kv_width + q_width * a.hidden_size
    if a.attention_bias:
        attention += q_width + 2 * kv_width
    embeddings = a.vocab_size * a.hidden_size
    return ParamCount(
        embeddings=embeddings,
        lm_head=0 if a.tie_word_embeddings else embeddings,
        attention_per_layer=attention,
        mlp_per_layer=3 * a.hidden_size * a.intermediate_size,
        norms_per_layer=2 * a.hidden_size,
        final_norm=a.hidden_size,
        num_layers=a.num_layers,
    )
