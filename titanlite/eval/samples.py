"""The recipe's fixed sample prompts (§7.3), completed greedily so runs can be compared by eye."""

from __future__ import annotations

import torch

from titanlite.models.gpt.generate import generate

SAMPLE_PROMPTS = (
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
)


@torch.no_grad()
def sample_completions(model, tokenizer, max_new_tokens: int = 16, prompts=SAMPLE_PROMPTS) -> list[str]:
    """Each prompt BOS-prefixed, greedy, `max_new_tokens` new tokens; stops early at BOS."""
    bos = tokenizer.bos_token_id
    completions = []
    for prompt in prompts:
        tokens = tokenizer.encode(prompt, prepend=bos)
        new = []
        for token in generate(model, tokens, max_new_tokens, temperature=0.0):
            if token == bos:
                break
            new.append(token)
        completions.append(prompt + tokenizer.decode(new))
    return completions
