"""transformers' greedy answers to the SmolLM2 engine tests' prompts, kept in a file.

Generating them (8 prompts x 64 tokens with transformers in float32) was the longest setup in
the suite, and every run got the same numbers. tests/data/smollm2_hf_greedy.json holds them
under a key: the GGUF's sha256 and the transformers and torch versions. The engine tests read
the file when the key matches what is installed and ask transformers for everything when it
doesn't; tests/engine/test_hf_golden.py fails while the key is stale, and checks at every run
that transformers still gives the stored answer for two of the prompts.

    python tests/hf_golden.py      # rewrite the file (after a weights or version change)
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

GOLDEN = Path(__file__).parent / "data" / "smollm2_hf_greedy.json"
NEW_TOKENS = 64
CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain recursion to a five-year-old, in two sentences.",
    "List three prime numbers greater than 100.",
    "Translate 'good morning, how are you?' into Spanish and German.",
]
RAW = [
    "def fibonacci(n):\n    ",
    "The quick brown fox",
    "Once upon a time, in a small village by the mountains, there lived an old clockmaker who",
]
LIVE_CHECKED = (0, 7)  # the shortest chat and the longest raw prompt, asked again each run

Reference = tuple[list[int], list[float]]  # greedy tokens, the logprob of each


def engine_prompts(tokenizer: Any) -> list[list[int]]:
    """The prompts' token ids: the chats through the chat template, the raw texts as they are."""
    chats = [
        tokenizer.encode(
            tokenizer.apply_chat_template([{"role": "user", "content": c}]),
            add_special_tokens=False,
        )
        for c in CHATS
    ]
    return chats + [tokenizer.encode(r) for r in RAW]


def key(gguf_path: str) -> dict[str, str]:
    """What the stored answers depend on."""
    import torch
    import transformers

    digest = hashlib.sha256()
    with open(gguf_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return {
        "gguf_sha256": digest.hexdigest(),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }


def stored() -> dict[str, Any]:
    return json.loads(GOLDEN.read_text())


def load(gguf_path: str, prompts: list[list[int]]) -> list[Reference] | None:
    """The stored answers, or None if they were made for other weights, versions or prompts."""
    data = stored()
    if data["key"] != key(gguf_path) or data["prompts"] != prompts:
        return None
    if data["new_tokens"] != NEW_TOKENS:
        return None
    return [(r["tokens"], r["logprobs"]) for r in data["references"]]


def write(gguf_path: str, prompts: list[list[int]], references: list[Reference]) -> None:
    data = {
        "key": key(gguf_path),
        "new_tokens": NEW_TOKENS,
        "prompts": prompts,
        "references": [{"tokens": t, "logprobs": lp} for t, lp in references],
    }
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(data, indent=1) + "\n")


def main() -> int:
    import torch
    from hf_ref import hf_greedy
    from transformers import AutoModelForCausalLM

    from splitserve.bench.hf_baseline import gguf_parsed_once
    from splitserve.model.loader import default_model_path, open_checkpoint

    path = default_model_path()
    prompts = engine_prompts(open_checkpoint(path).tokenizer)
    folder, name = os.path.split(path)
    with gguf_parsed_once():
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    write(path, prompts, [hf_greedy(model, p, NEW_TOKENS) for p in prompts])
    print(f"wrote {GOLDEN} ({len(prompts)} prompts x {NEW_TOKENS} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
