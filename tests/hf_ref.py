"""Hugging Face transformers as the reference: greedy tokens and their logprobs."""

from __future__ import annotations

import torch


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    tokens = out.sequences[0, len(prompt) :].tolist()
    logprobs = [
        torch.log_softmax(step[0].float(), -1)[t].item()
        for step, t in zip(out.logits, tokens, strict=True)
    ]
    return tokens, logprobs


def assert_matches(outputs, references, atol: float = 1e-3) -> None:
    """Each engine output has the reference's greedy tokens and logprobs within atol."""
    for i, (out, (tokens, logprobs)) in enumerate(zip(outputs, references, strict=True)):
        assert out.new_token_ids == tokens, f"prompt {i}: tokens differ"
        worst = max(abs(a - b) for a, b in zip(out.new_logprobs, logprobs, strict=True))
        assert worst < atol, f"prompt {i}: logprob differs by {worst}"
