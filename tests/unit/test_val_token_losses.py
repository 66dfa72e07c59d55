"""val_bpb's per-token losses: the chunked path equals the textbook loss, and at d26 shapes it needs no more
memory than the training head does (FakeTensorMode on fake CUDA tensors + torch's MemTracker: no storage)."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

from titanlite.models.gpt import ops
from titanlite.models.gpt.model import GPT, GPTArgs, Unembedding
from titanlite.models.llama import model as llama_model
from titanlite.models.llama.model import Llama, LlamaArgs
from titanlite.parallelize import materialize

GPT_ARGS = GPTArgs(n_layer=2, n_embd=64, n_head=2, n_kv_head=2, head_dim=32, vocab_size=500, sequence_len=32,
                   window_pattern="L", attention_backend="sdpa")
LLAMA_ARGS = LlamaArgs(n_layer=2, n_embd=64, n_head=2, n_kv_head=1, head_dim=32, ffn_dim=192, vocab_size=500,
                       sequence_len=32, attention_backend="sdpa")


def textbook_token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[target] per position, written out; 0 where the target is ignored (-1)."""
    logits = logits.double()
    log_probs = logits - logits.logsumexp(dim=-1, keepdim=True)
    picked = log_probs.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return torch.where(targets >= 0, -picked, torch.zeros_like(picked))


def _batch(vocab: int):
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, vocab, (3, 32), generator=g)
    targets = torch.randint(0, vocab, (3, 32), generator=g)
    targets[1, 5:9] = -1
    return idx, targets


@torch.no_grad()
def _randomized(model):
    g = torch.Generator().manual_seed(5)
    for p in model.parameters():
        if p.ndim == 2:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)  # logits of a few units: the softcap matters
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt_per_token_losses_equal_the_textbook_loss_across_chunks(monkeypatch, dtype):
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(GPT_ARGS)
    model = _randomized(materialize(model, "cpu"))
    model.set_compute_dtype(dtype)
    monkeypatch.setitem(ops.HEAD_CHUNK_ELEMENTS, "cpu", 512 * 7)  # 7 rows a chunk: 96 tokens in 14 chunks
    idx, targets = _batch(GPT_ARGS.vocab_size)
    with torch.no_grad():
        losses = model(idx, targets, loss_reduction="none")
        softcapped = model(idx)  # fp32 c * tanh(logits / c), the head's logits as generation sees them
    assert losses.shape == targets.shape and losses.dtype == torch.float32
    expected = textbook_token_losses(softcapped, targets)
    assert (losses[1, 5:9] == 0).all()
    tol = 1e-5 if dtype == torch.float32 else 2e-4  # the chunk's softcap goes through a sigmoid, not tanh
    torch.testing.assert_close(losses.double(), expected, rtol=tol, atol=tol)


def test_llama_per_token_losses_equal_the_textbook_loss_across_chunks(monkeypatch):
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Llama(LLAMA_ARGS)
    model = _randomized(materialize(model, "cpu"))
    monkeypatch.setattr(llama_model, "EVAL_CHUNK_ELEMENTS", 512 * 10)
    idx, targets = _batch(LLAMA_ARGS.vocab_size)
    with torch.no_grad():
        losses = model(idx, targets, loss_reduction="none")
        logits = model(idx)
    torch.testing.assert_close(losses.double(), textbook_token_losses(logits, targets), rtol=1e-6, atol=1e-6)


# d26 at the gpt2_d26 config's device batch: width 1664, T 2048, vocab 32768 (bf16 compute, fp32 master head)
D26 = SimpleNamespace(width=1664, vocab=32768, tokens=16 * 2048)


def _d26_head_peak(train: bool) -> int:
    """Peak bytes MemTracker counts for the GPT head at d26 under FakeTensorMode (no storage): the training fused
    head's forward and backward, or val_bpb's per-token losses, with the head input and targets already there.

    Fake CPU tensors laid out as on a GPU (the CUDA chunk size and rows-major logits): fake CUDA tensors cannot
    run autograd on a CPU-only build (its engine asks for a CUDA device guard).
    """
    with FakeTensorMode():
        with torch.device("meta"):
            head = Unembedding(D26.width, D26.vocab)
        head.weight = torch.nn.Parameter(torch.empty(D26.vocab, D26.width))  # the fp32 master
        x = torch.empty(D26.tokens, D26.width, dtype=torch.bfloat16, requires_grad=train)
        targets = torch.zeros(D26.tokens, dtype=torch.long)
        owner = SimpleNamespace(lm_head=head, args=SimpleNamespace(softcap=15.0, vocab_size=D26.vocab))
        owner.logits = lambda h: GPT.logits(owner, h)
        tracker = MemTracker()
        tracker.track_external(head, x, targets)
        with tracker:
            if train:
                GPT.loss(owner, x, targets, "sum").backward()
            else:
                with torch.no_grad():
                    GPT.loss(owner, x, targets, "none")
        return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


def test_val_losses_at_d26_need_no_more_memory_than_the_training_head(monkeypatch):
    """Before, val_bpb took the unfused head: fp32 logits of 32,768 tokens x 32,768 several times over (~13 GB
    here). The training step holds at least its head's peak plus every activation, so staying within the
    training head's peak keeps evaluation inside the step's."""
    monkeypatch.setitem(ops.HEAD_CHUNK_ELEMENTS, "cpu", ops.HEAD_CHUNK_ELEMENTS["cuda"])
    monkeypatch.setattr(ops, "VOCAB_DIM", {})
    train, val = _d26_head_peak(train=True), _d26_head_peak(train=False)
    logits_fp32 = D26.tokens * D26.vocab * 4  # one fp32 copy of the whole batch's logits: 4 GiB
    assert val <= train
    assert val < logits_fp32 / 2
