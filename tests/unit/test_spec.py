"""The TrainSpec registry is real: GPT is found by name, and a second toy model trains through the same path."""

import math
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import titanlite.spec as spec_module
from titanlite.config.sections import ModelConfig, OptimizerConfig, TrainingConfig
from titanlite.errors import UserError
from titanlite.models.gpt import GPT, GPTArgs
from titanlite.scaling import Plan, derive_plan
from titanlite.spec import TrainSpec, get_train_spec, register_train_spec, registered_names



@dataclass
class ToyArgs:
    vocab_size: int
    n_embd: int


class ToyBigram(nn.Module):
    """Embedding -> linear head: the smallest language model that can learn a bigram table."""

    def __init__(self, args: ToyArgs):
        super().__init__()
        self.args = args
        self.emb = nn.Embedding(args.vocab_size, args.n_embd)
        self.head = nn.Linear(args.n_embd, args.vocab_size, bias=False)

    def init_weights(self):
        nn.init.normal_(self.emb.weight, std=1.0)
        nn.init.zeros_(self.head.weight)

    def forward(self, idx, targets=None, loss_reduction="mean"):
        logits = self.head(self.emb(idx))
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction=loss_reduction)


def toy_args_from_plan(plan: Plan, model_cfg: ModelConfig) -> ToyArgs:
    return ToyArgs(vocab_size=plan.vocab_size, n_embd=plan.n_embd)


def toy_build_optimizers(model: nn.Module, plan: Plan, optimizer_cfg: OptimizerConfig):
    return torch.optim.AdamW(model.parameters(), lr=0.05)


@pytest.fixture
def toy_registered(monkeypatch):
    monkeypatch.setattr(spec_module, "_REGISTRY", dict(spec_module._REGISTRY))  # undone after the test
    spec = TrainSpec(name="toy", model_args_cls=ToyArgs, model_cls=ToyBigram, args_from_plan=toy_args_from_plan,
                     build_optimizers=toy_build_optimizers)
    register_train_spec(spec)
    return spec


def test_gpt_is_registered_by_default():
    spec = get_train_spec("gpt")
    assert spec.model_cls is GPT and spec.model_args_cls is GPTArgs
    assert "gpt" in registered_names()


def test_unknown_name_lists_registered(toy_registered):
    with pytest.raises(UserError, match=r"model.name = 'llama' is not a registered model; registered: gpt, toy"):
        get_train_spec("llama")


def test_duplicate_registration_is_refused(toy_registered):
    with pytest.raises(ValueError, match="already registered"):
        register_train_spec(toy_registered)
    register_train_spec(replace(toy_registered, build_loss=None), replace=True)


def train_through_spec(name: str, model_cfg: ModelConfig, steps: int) -> list[float]:
    """What the trainer does, using only the TrainSpec: plan -> meta model -> real weights -> optimizer -> loss."""
    torch.manual_seed(0)
    training = TrainingConfig(device_batch_size=4, total_batch_size=4 * 16, num_iterations=steps)
    plan = derive_plan(model_cfg, training, OptimizerConfig(), vocab_size=64, world_size=1)
    spec = get_train_spec(name)
    model = spec.build_meta_model(plan, model_cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    optimizer = (spec.build_optimizers(model, plan, OptimizerConfig()) if spec.build_optimizers
                 else torch.optim.AdamW(model.parameters(), lr=0.01))
    loss_fn = spec.loss_fn()
    # a deterministic bigram language: next token = (3 * token + 1) mod 64
    x = torch.randint(0, 64, (4, 17))
    x[:, 1:] = 0
    for t in range(1, 17):
        x[:, t] = (3 * x[:, t - 1] + 1) % 64
    inputs, targets = x[:, :-1], x[:, 1:]
    losses = []
    for _ in range(plan.num_iterations):
        loss = loss_fn(model, inputs, targets) / targets.numel()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_toy_model_trains_through_the_spec(toy_registered):
    losses = train_through_spec("toy", ModelConfig(name="toy", depth=1, aspect_ratio=32, head_dim=32,
                                                   max_seq_len=16), steps=15)
    assert losses[0] == pytest.approx(math.log(64), abs=1e-4)  # zero head: uniform prediction
    assert losses[-1] < 0.5 * losses[0]


def test_gpt_trains_through_the_spec():
    losses = train_through_spec("gpt", ModelConfig(depth=2, aspect_ratio=32, head_dim=32, max_seq_len=16,
                                                   attention_backend="sdpa"), steps=10)
    assert losses[0] == pytest.approx(math.log(64), abs=0.05)
    assert losses[-1] < losses[0] - 0.5
