"""The recipe's fixed sample prompts (§7.3), completed greedily so runs can be compared by eye."""

from __future__ import annotations

import torch
import torch.distributed as dist

from titanlite.generate import complete

SAMPLE_PROMPTS = (
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
)


def _in_process_group() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def sample_completions(model, tokenizer, max_new_tokens: int = 16, prompts=SAMPLE_PROMPTS,
                       lockstep: bool | None = None) -> list[str]:
    """Each prompt BOS-prefixed, greedy, `max_new_tokens` new tokens; the text stops at BOS.

    Every rank of a process group calls this together (the model may be sharded), so by default the ranks run
    in lockstep: the same number of forwards per prompt even when one rank's completion hits BOS early.
    """
    bos = tokenizer.bos_token_id
    lockstep = _in_process_group() if lockstep is None else lockstep
    completions = []
    for prompt in prompts:
        new = complete(model, tokenizer.encode(prompt, prepend=bos), max_new_tokens, stop_token=bos,
                       lockstep=lockstep, temperature=0.0)
        completions.append(prompt + tokenizer.decode(new))
    return completions
