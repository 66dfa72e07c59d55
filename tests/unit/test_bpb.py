import math

import torch

from titanlite.eval.bpb import evaluate_bpb


class _FixedLoss(torch.nn.Module):
    def __init__(self, losses):
        super().__init__()
        self.losses = losses

    def forward(self, inputs, targets, loss_reduction="mean"):
        assert loss_reduction == "none"
        return self.losses


def test_val_bpb_matches_direct_computation_and_skips_specials():
    torch.manual_seed(0)
    vocab = 20
    token_bytes = torch.randint(1, 5, (vocab,), dtype=torch.int32)
    token_bytes[17:] = 0  # special tokens have no bytes
    targets = torch.randint(0, vocab, (3, 11))
    targets[0, 0] = 18
    targets[1, 2] = -1  # ignored position
    losses = torch.rand(3, 11) * 5
    bpb = evaluate_bpb(_FixedLoss(losses), iter([(targets, targets)] * 2), 2, token_bytes)
    nats = nbytes = 0.0
    for b in range(3):
        for t in range(11):
            y = int(targets[b, t])
            if y >= 0 and token_bytes[y] > 0:
                nats += float(losses[b, t])
                nbytes += int(token_bytes[y])
    assert math.isclose(bpb, (2 * nats) / (math.log(2) * 2 * nbytes), rel_tol=1e-9)


def test_val_bpb_is_inf_without_bytes():
    token_bytes = torch.zeros(4, dtype=torch.int32)
    targets = torch.zeros(1, 3, dtype=torch.long)
    assert evaluate_bpb(_FixedLoss(torch.ones(1, 3)), iter([(targets, targets)]), 1, token_bytes) == math.inf
