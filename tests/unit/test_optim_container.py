import math
from types import SimpleNamespace

import pytest
import torch

from titanlite.config.sections import LRSchedulerConfig, OptimizerConfig
from titanlite.models.gpt.spec import GPT_SPEC
from titanlite.optim import build_optimizers
from titanlite.spec import LRScales


def _param_groups():
    torch.manual_seed(0)
    make = lambda *shape: torch.nn.Parameter(torch.randn(*shape) * 0.1)  # noqa: E731
    return {
        "lm_head": [make(50, 16)], "wte": [make(50, 16)], "value_embeds": [make(50, 16), make(50, 16)],
        "resid_lambdas": [make(2)], "x0_lambdas": [make(2)], "smear": [make(1, 8), make(1), make(1)],
        "matrices": [make(16, 16), make(64, 16), make(16, 64), make(16, 16), make(2, 12)],
    }


def _plan(cfg, bls=1.0, dms=1.0, wd=0.2, n=10):
    """What derive_plan hands the builder: the GPT's groups at these LR scales, and the horizon."""
    groups = GPT_SPEC.optimizer_groups(cfg, LRScales(batch=bls, width=dms, muon_weight_decay=wd))
    return SimpleNamespace(groups=groups, num_iterations=n)


def test_recipe_d24_effective_learning_rates_and_betas():
    # Recipe §2.6 worked example for d24 (B = 2^20: bls = sqrt 2, C = 1536: dms = 1/sqrt 2).
    cfg = OptimizerConfig(unembedding_lr=0.008, embedding_lr=0.3, matrix_lr=0.02, scalar_lr=0.5)
    opt = build_optimizers(_param_groups(), cfg, _plan(cfg, bls=math.sqrt(2), dms=1 / math.sqrt(2), wd=0.059738))
    adam = {g["name"]: g for g in opt.adamw.param_groups}
    expected = {"lm_head": (0.008, (0.8, 0.95), 0.01), "wte": (0.3, (0.8, 0.95), 0.001),
                "value_embeds": (0.15, (0.8, 0.95), 0.01), "resid_lambdas": (0.0070711, (0.8, 0.95), 0.05),
                "x0_lambdas": (0.70711, (0.96, 0.95), 0.0), "smear": (0.2, (0.8, 0.95), 0.0)}
    for name, (lr, betas, wd) in expected.items():
        assert adam[name]["lr"] == pytest.approx(lr, rel=1e-4), name
        assert adam[name]["betas"] == betas and adam[name]["weight_decay"] == wd and adam[name]["eps"] == 1e-10
    muon = opt.muon.param_groups  # sorted by shape tuple (numerically, as the recipe does)
    assert [g["name"] for g in muon] == ["matrices_2x12", "matrices_16x16", "matrices_16x64", "matrices_64x16"]
    assert all(g["initial_lr"] == pytest.approx(0.028284, rel=1e-4) for g in muon)
    assert all(g["initial_weight_decay"] == 0.059738 and g["beta2"] == 0.9 and g["ns_steps"] == 5 for g in muon)


def test_adam_betas_from_config_reach_only_embedding_groups():
    cfg = OptimizerConfig(adam_beta1=0.7, adam_beta2=0.99)
    adam = {g["name"]: g for g in build_optimizers(_param_groups(), cfg, _plan(cfg)).adamw.param_groups}
    assert adam["lm_head"]["betas"] == adam["wte"]["betas"] == adam["value_embeds"]["betas"] == (0.7, 0.99)
    assert adam["x0_lambdas"]["betas"] == (0.96, 0.95) and adam["smear"]["betas"] == (0.8, 0.95)


def test_per_group_beta2_keys_reproduce_the_recipe():
    cfg = OptimizerConfig(adam_beta1=0.8, adam_beta2=0.95, unembedding_beta2=0.96, embedding_beta2=0.995)
    adam = {g["name"]: g for g in build_optimizers(_param_groups(), cfg, _plan(cfg)).adamw.param_groups}
    assert adam["lm_head"]["betas"] == (0.8, 0.96)
    assert adam["wte"]["betas"] == adam["value_embeds"]["betas"] == (0.8, 0.995)


def test_step_applies_schedule_to_every_group():
    sched = LRSchedulerConfig(warmup_steps=2, warmdown_ratio=0.5, final_lr_frac=0.1, momentum_warmup_steps=4)
    groups = _param_groups()
    opt = build_optimizers(groups, OptimizerConfig(), _plan(OptimizerConfig(), wd=0.2, n=10), sched)
    for step in range(10):
        for params in groups.values():
            for p in params:
                p.grad = torch.randn(p.shape)
        opt.step(step)
        s = opt.schedule
        assert opt.current() == {"lrm": s.lr_multiplier(step), "momentum": s.muon_momentum(step),
                                 "muon_wd": 0.2 * s.muon_weight_decay_factor(step)}
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(g["initial_lr"] * s.lr_multiplier(step))
        assert all(g["momentum"] == s.muon_momentum(step) for g in opt.muon.param_groups)
        opt.zero_grad()
        assert all(p.grad is None for params in groups.values() for p in params)
    assert opt.current()["lrm"] == pytest.approx(0.1 + 0.9 / 5)
    assert opt.muon.orthogonalized_matrices == 50


def test_container_state_dict_round_trip():
    groups = _param_groups()
    opt = build_optimizers(groups, OptimizerConfig(), _plan(OptimizerConfig()))
    for p in (p for ps in groups.values() for p in ps):
        p.grad = torch.ones(p.shape)
    opt.step(0)
    state = opt.state_dict()
    assert set(state) == {"schedule", "adamw", "muon"}
    fresh = build_optimizers(_param_groups(), OptimizerConfig(), _plan(OptimizerConfig()))
    fresh.load_state_dict(state)
    assert torch.equal(fresh.adamw.state_dict()["wte.0"]["exp_avg"], state["adamw"]["wte.0"]["exp_avg"])
    assert torch.equal(fresh.muon.state_dict()["matrices_64x16.0"]["momentum_buffer"],
                       state["muon"]["matrices_64x16.0"]["momentum_buffer"])


def test_rejects_unknown_and_duplicated_groups():
    with pytest.raises(ValueError, match="unknown optimizer param groups"):
        build_optimizers({"embeddings": [torch.nn.Parameter(torch.zeros(2))]}, OptimizerConfig(),
                         _plan(OptimizerConfig()))
    p = torch.nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="more than one"):
        build_optimizers({"wte": [p], "matrices": [p]}, OptimizerConfig(), _plan(OptimizerConfig()))


@pytest.mark.parametrize("native_bf16, expected", [(False, torch.float32), (True, torch.bfloat16)])
def test_muon_orthogonalises_in_bf16_on_cpu_only_where_bf16_is_native(monkeypatch, native_bf16, expected):
    """Without avx512_bf16/AMX, bf16 batched matmuls are emulated (far slower than fp32): fp32 there."""
    import titanlite.optim.builder as builder

    monkeypatch.setattr(builder, "cpu_has_native_bf16", lambda: native_bf16)
    opt = build_optimizers(_param_groups(), OptimizerConfig(), _plan(OptimizerConfig()), compute_dtype=torch.bfloat16)
    assert opt.muon.compute_dtype == expected
    fp32 = build_optimizers(_param_groups(), OptimizerConfig(), _plan(OptimizerConfig()), compute_dtype=torch.float32)
    assert fp32.muon.compute_dtype == torch.float32
