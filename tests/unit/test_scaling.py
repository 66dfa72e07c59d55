"""The depth dial reproduces docs/recipe.md §2.3–2.6 and refuses impossible plans with the numbers."""

import math
from dataclasses import replace

import pytest
import torch

from titanlite.config.sections import ModelConfig, OptimizerConfig, TrainingConfig
from titanlite.errors import UserError
from titanlite.models.gpt.model import GPT, GPTArgs
from titanlite.scaling import derive_plan, format_plan

MODEL = ModelConfig()  # aspect 64, head_dim 128, T 2048, SSSL
TRAIN = TrainingConfig(target_param_data_ratio=12, device_batch_size=16)
OPTIM = OptimizerConfig(weight_decay=0.28)

# depth -> (width, heads, total, scaling, FLOPs/token, log2 auto batch, iters @ 12, batch LR scale, scaled WD)
TABLE = {
    4: (256, 2, 36_700_242, 11_534_384, 8.0216e7, 18, 528, 0.7071, 1.8899),
    8: (512, 4, 125_829_354, 41_943_232, 2.9570e8, 18, 1920, 0.7071, 0.5197),
    12: (768, 6, 286_261_730, 110_100_912, 7.5970e8, 19, 2520, 1.0, 0.2800),
    16: (1024, 8, 536_871_738, 234_881_792, 1.5855e9, 19, 5376, 1.0, 0.1313),
    18: (1152, 9, 701_891_594, 324_404_172, 2.1800e9, 20, 3712, 1.4142, 0.1344),
    20: (1280, 10, 896_533_746, 435_160_240, 2.8862e9, 20, 4980, 1.4142, 0.1002),
    24: (1536, 12, 1_384_122_122, 729_810_624, 4.7752e9, 20, 8352, 1.4142, 0.0597),
    26: (1664, 13, 1_681_786_938, 918_423_532, 5.9911e9, 20, 10510, 1.4142, 0.0475),
    32: (2048, 16, 2_818_575_450, 1_677_724_672, 1.0771e10, 21, 9600, 2.0, 0.0368),
}


def plan_for(depth=12, world_size=1, model=MODEL, training=TRAIN, optim=OPTIM, vocab=32768, **train_overrides):
    return derive_plan(replace(model, depth=depth), replace(training, **train_overrides), optim, vocab, world_size)


@pytest.mark.parametrize("depth", sorted(TABLE))
def test_plan_reproduces_recipe_table(depth):
    width, heads, total, scaling, flops, log2_batch, iters, bls, wd = TABLE[depth]
    p = plan_for(depth)
    a = p.model_args
    assert (a.n_layer, a.n_embd, a.n_head, a.n_kv_head, a.head_dim) == (depth, width, heads, heads, 128)
    assert p.params["total"] == total and p.scaling_params == scaling
    assert float(f"{p.flops_per_token:.4e}") == flops
    assert p.auto_batch_size and p.total_batch_size == 2 ** log2_batch
    assert p.num_iterations == iters and p.horizon_source == "target_param_data_ratio"
    assert round(p.batch_lr_scale, 4) == bls and round(p.weight_decay_scaled, 4) == wd
    assert p.reference_scaling_params == 110_100_912
    assert p.grad_accum_steps == p.total_batch_size // (16 * 2048)
    assert p.total_tokens == p.total_batch_size * iters
    assert p.total_flops == pytest.approx(p.flops_per_token * p.total_tokens)
    assert p.width_lr_scale == pytest.approx((width / 768) ** -0.5)


def test_d24_effective_values():
    p = plan_for(24, optim=replace(OPTIM, unembedding_lr=0.008))
    assert p.weight_decay_scaled == pytest.approx(0.059738, abs=1e-6)
    # d24: batch 2^20 -> batch scale sqrt(2); width 1536 -> width scale 1/sqrt(2) (docs/recipe.md §2.6 arithmetic)
    expected = {"lm_head": 0.008,                     # bls * dms = sqrt(2) / sqrt(2)
                "wte": 0.3, "value_embeds": 0.15,      # value embeddings run at half the embedding LR
                "resid_lambdas": 0.5 * math.sqrt(2) * 0.01, "x0_lambdas": 0.5 * math.sqrt(2),
                "smear": 0.2,                          # fixed, no batch or width scaling
                "matrices": 0.028284}
    assert p.group_lrs == pytest.approx(expected, abs=1e-6)


def _meta_model(p):
    with torch.device("meta"):
        return GPT(p.model_args)


def test_window_sizes_and_full_layers_in_plan():
    # docs/recipe.md §1.3: d26 + SSSL has full layers 3, 7, ..., 23 and the forced last layer 25; S at T 1024 is 256
    d26 = plan_for(26)
    assert "short window 512, full layers 3, 7, 11, 15, 19, 23, 25" in "\n".join(d26.model_lines)
    assert [i for i, b in enumerate(_meta_model(d26).blocks) if b.attn.window == 2048] == [3, 7, 11, 15, 19, 23, 25]
    t1024 = plan_for(12, model=replace(MODEL, max_seq_len=1024))
    assert {b.attn.window for b in _meta_model(t1024).blocks} == {256, 1024}
    full = plan_for(12, model=replace(MODEL, window_pattern="L"))
    assert "short window none, full layers 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11" in "\n".join(full.model_lines)


def test_odd_width_rounds_up_to_head_dim():
    p = plan_for(25)
    assert (p.model_args.n_embd, p.model_args.n_head) == (1664, 13)  # docs/recipe.md §1.1: 1600 rounds up to 1664


def test_horizon_precedence():
    p = plan_for(12, num_iterations=7, target_flops=1e18)
    assert (p.num_iterations, p.horizon_source) == (7, "num_iterations")
    p = plan_for(12, target_flops=1e18)
    assert p.horizon_source == "target_flops"
    assert p.num_iterations == round(1e18 / (p.flops_per_token * 2 ** 19))
    p = plan_for(12, target_param_data_ratio=20)
    assert p.num_iterations == int(20 * 110_100_912) // 2 ** 19
    with pytest.raises(UserError, match="num_iterations, training.target_flops and training.target_param"):
        plan_for(12, target_param_data_ratio=-1)


def test_user_batch_size_and_grad_accum():
    p = plan_for(12, world_size=2, total_batch_size=2 ** 20, device_batch_size=8)
    assert not p.auto_batch_size and p.total_batch_size == 2 ** 20
    assert p.tokens_per_micro_step == 8 * 2048 * 2 and p.grad_accum_steps == 32
    assert p.batch_lr_scale == pytest.approx(math.sqrt(2))
    with pytest.raises(UserError, match=r"1,000,000 tokens is not a multiple of .* 8 x 2048 x 2 = 32,768"):
        plan_for(12, world_size=2, total_batch_size=1_000_000, device_batch_size=8)


def test_bad_dims_are_user_errors():
    with pytest.raises(UserError, match="model.depth"):
        plan_for(0)
    with pytest.raises(UserError, match="window_pattern"):
        plan_for(12, model=replace(MODEL, window_pattern="SQ"))


def test_format_plan_block():
    text = format_plan(plan_for(12))
    for expected in ("depth 12", "width 768", "heads 6", "wte 25,165,824", "value_embeds 150,994,944",
                     "transformer_matrices 84,935,088", "scalars 50", "total 286,261,730",
                     "scaling params    : 110,100,912", "FLOPs per token   : 7.5970e+08",
                     "tokens per step   : 524,288 (auto, 2^19)", "grad accumulation : 16",
                     "iterations        : 2,520", "total tokens      : 1,321,205,760", "tokens:params     : 12.00",
                     "total FLOPs       : 1.0037e+18", "batch 1.0000", "matrices 0.02 ", "0.28 -> 0.28"):
        assert expected in text, expected


# Published by group (docs/recipe.md §2.3, "d24 by group" / "d12 by group"); d26's groups are not published.
PUBLISHED_GROUPS = {
    12: {"wte": 25_165_824, "value_embeds": 150_994_944, "lm_head": 25_165_824,
         "transformer_matrices": 84_935_088, "scalars": 50},
    24: {"wte": 50_331_648, "value_embeds": 603_979_776, "lm_head": 50_331_648,
         "transformer_matrices": 679_478_976, "scalars": 74},
}


def params_from_module_shapes(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts by docs/recipe.md §2.1 group, read off the built model's parameter shapes."""
    groups = dict.fromkeys(("wte", "value_embeds", "lm_head", "transformer_matrices", "scalars"), 0)
    for name, param in model.named_parameters():
        if name == "wte.weight":
            group = "wte"
        elif name.startswith("value_embeds."):
            group = "value_embeds"
        elif name == "lm_head.weight":
            group = "lm_head"
        elif name.startswith("blocks."):
            group = "transformer_matrices"
        else:  # resid/x0 lambdas, smear gate weights, smear and backout lambdas
            group = "scalars"
        groups[group] += math.prod(param.shape)
    groups["total"] = sum(groups.values())
    return groups


def flops_from_module_shapes(model: torch.nn.Module, seq_len: int, pattern: str) -> int:
    """Recipe §2.2 written out: 6 x the in x out of every Linear (block matrices, VE gates, lm_head, smear gate)
    + 12 x (heads x head_dim) x min(window, T) per layer, windows by §1.3 (S = ceil(T/4/128) x 128, last L)."""
    matmul_weights = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    n_layer = len(model.blocks)
    short = math.ceil(seq_len / 4 / 128) * 128
    windows = [seq_len if pattern[i % len(pattern)] == "L" or i == n_layer - 1 else short for i in range(n_layer)]
    attention = sum(12 * b.attn.c_q.out_features * min(w, seq_len) for b, w in zip(model.blocks, windows))
    return 6 * matmul_weights + attention


@pytest.mark.parametrize("depth", [12, 24, 26])
def test_dry_run_d26_on_meta_matches_plan(depth):
    """The plan's counts against (a) the published table and (b) a meta model of the recipe's architecture built
    here from the sizing rule (§1.1: width ceil(64 d / 128) x 128, heads width / 128, vocab 32768, T 2048),
    counted off its module shapes. Building it allocates no real storage."""
    width, heads, total, scaling, flops = TABLE[depth][:5]
    assert width == -(-depth * 64 // 128) * 128 and heads == width // 128
    p = plan_for(depth)
    with torch.device("meta"):
        model = GPT(GPTArgs(n_layer=depth, n_embd=width, n_head=heads, n_kv_head=heads, head_dim=128,
                            vocab_size=32768, sequence_len=2048, window_pattern="SSSL"))
    assert all(t.is_meta for t in model.parameters())
    assert isinstance(model.blocks, torch.nn.ModuleList) and len(model.blocks) == depth
    counted = params_from_module_shapes(model)
    # (a) published
    assert p.params["total"] == total and p.scaling_params == scaling
    assert float(f"{p.flops_per_token:.4e}") == flops
    if depth in PUBLISHED_GROUPS:
        assert {k: v for k, v in p.params.items() if k != "total"} == PUBLISHED_GROUPS[depth]
    # (b) the module shapes: every group, scaling params = transformer matrices + lm_head (§2.1), FLOPs exact
    assert p.params == counted
    assert p.scaling_params == counted["transformer_matrices"] + counted["lm_head"]
    assert p.flops_per_token == flops_from_module_shapes(model, 2048, "SSSL")
    assert model.num_params() == counted  # the model's own bookkeeping agrees with its shapes
