"""Token-by-token generation with a KV cache, for any model family (sampling during training, base_eval).

The model protocol (titanlite.spec): forward(ids, kv_cache=cache) -> logits, and new_kv_cache(batch, max_len).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class KVCache:
    """Keys/values of every layer for a batch of rows (and `prev_embed`, for a model that mixes in the previous
    token's embedding, such as the GPT's smear).

    The model writes each layer's new k/v at `pos` and attends over the filled prefix; `advance` moves `pos`
    once all layers have run.
    """

    def __init__(self, n_layer: int, batch_size: int, max_len: int, n_kv_head: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (n_layer, batch_size, max_len, n_kv_head, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0
        self.prev_embed: torch.Tensor | None = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.pos + k.size(1)
        if end > self.k.size(2):
            raise ValueError(f"KV cache holds {self.k.size(2)} positions, {end} requested")
        self.k[layer, :, self.pos:end] = k
        self.v[layer, :, self.pos:end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def advance(self, n: int) -> None:
        self.pos += n


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids; temperature 0 is greedy."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, tokens: list[int], max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, seed: int = 42, use_cache: bool = True) -> Iterator[int]:
    """Yield `max_new_tokens` token ids continuing `tokens`, one at a time.

    `use_cache=False` recomputes the whole prefix each step (the reference the cached path must match).
    """
    if not tokens:
        raise ValueError("generate needs at least one prompt token (e.g. BOS)")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    ids = torch.tensor([tokens], dtype=torch.long, device=device)
    cache = model.new_kv_cache(1, len(tokens) + max_new_tokens) if use_cache else None
    logits = model(ids, kv_cache=cache)[:, -1]
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, generator)
        yield int(nxt.item())
        if step == max_new_tokens - 1:
            break
        if use_cache:
            logits = model(nxt.view(1, 1), kv_cache=cache)[:, -1]
        else:
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            logits = model(ids)[:, -1]


@torch.no_grad()
def complete(model, tokens: list[int], max_new_tokens: int, stop_token: int | None = None,
             lockstep: bool = False, **sampling) -> list[int]:
    """The new tokens continuing `tokens`, up to (not including) `stop_token`.

    A sharded (FSDP) model all-gathers its weights inside every forward, so the ranks of a process group must
    all run the same number of forwards or the ones still generating wait forever for the ones that stopped.
    `lockstep=True` keeps generating past the stop token (the extra tokens are dropped), so every call makes
    exactly `max_new_tokens` forwards on every rank, whatever each rank's model predicts (CORE pads its
    batches to the same count for the same reason).
    """
    new: list[int] = []
    stopped = False
    for token in generate(model, tokens, max_new_tokens, **sampling):
        stopped = stopped or token == stop_token
        if stopped and not lockstep:
            break
        if not stopped:
            new.append(token)
    return new
