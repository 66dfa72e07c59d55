"""Float8 conversion (torchao, emulated on CPU): which modules swap, the filter, numerics, the eval swap-back."""

import dataclasses
import math

import pytest
import torch
import torch.nn as nn
from torchao.float8.float8_linear import Float8Linear  # torchao is a hard dependency of titanlite

from titanlite.config.sections import (ActivationCheckpointConfig, CompileConfig, Float8Config, ModelConfig,
                                       OptimizerConfig, TrainingConfig)
from titanlite.distributed import WorldInfo
from titanlite.errors import UserError
from titanlite.float8 import apply_float8, bf16_eval, check_float8_hardware, float8_modules
from titanlite.models.gpt.model import GPT, GPTArgs, Unembedding
from titanlite.models.gpt.parallelize import parallelize_gpt
from titanlite.parallelize import materialize
from titanlite.scaling import derive_plan

ARGS = GPTArgs(n_layer=2, n_embd=64, n_head=2, n_kv_head=2, head_dim=32, vocab_size=512, sequence_len=32,
               window_pattern="L", attention_backend="sdpa")
# every Linear of a depth-2 model except the 12->2 ve_gate and 24->1 smear_gate
EXPECTED = sorted([f"blocks.{i}.{name}" for i in range(2) for name in
                   ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")] + ["lm_head"])
EMULATED = Float8Config(enabled=True, emulate=True)
CPU_WORLD = WorldInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), mesh=None, dp_shard=1,
                      dp_replicate=1)



def plain_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return materialize(GPT_on_meta(), "cpu")


def GPT_on_meta() -> GPT:  # noqa: N802 - reads like the constructor it wraps
    with torch.device("meta"):
        return GPT(ARGS)


def float8_model(cfg: Float8Config = EMULATED, seed: int = 0, world: WorldInfo = CPU_WORLD) -> tuple[GPT, list[str]]:
    """The trainer's path: convert on meta inside parallelize_gpt, then materialize on the world's device."""
    model = parallelize_gpt(GPT_on_meta(), world, CompileConfig(enabled="false"), cfg,
                            ActivationCheckpointConfig())
    converted = [name for name, m in model.named_modules() if any(m is f for f in float8_modules(model))]
    torch.manual_seed(seed)
    return materialize(model, world.device), converted


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 512, (4, 32), generator=g), torch.randint(0, 512, (4, 32), generator=g)


def test_conversion_swaps_exactly_the_large_linears():
    model = GPT_on_meta()
    params_before = {name: p for name, p in model.named_parameters()}
    converted = apply_float8(model, EMULATED, "cpu")
    assert sorted(converted) == EXPECTED
    assert len(float8_modules(model)) == 13
    # the gates stay plain titanlite Linears; the swap keeps the very same Parameter objects
    assert type(model.blocks[1].attn.ve_gate).__name__ == "Linear"
    assert type(model.smear_gate).__name__ == "Linear"
    assert all(p is params_before[name] for name, p in model.named_parameters())
    assert apply_float8(GPT_on_meta(), Float8Config(enabled=False), "cpu") == []


def textbook_flops_per_token(model: nn.Module, seq_len: int, pattern: str) -> int:
    """FLOPs per token counted off the modules themselves (docs/recipe.md §2.2, written out here):
    6 x (in x out of every Linear's weight, float8 or not: each is one matmul per token) plus, per layer,
    12 x (heads x head_dim) x min(window, T) for QK^T and AV (2 matmuls x 2 FLOPs, x 3 for forward + backward).
    Windows by the recipe's rule (§1.3): L = T, S = ceil(T / 4 / 128) x 128, the last layer always L."""
    matmul_weights = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    n_layer = len(model.blocks)
    short = math.ceil(seq_len / 4 / 128) * 128
    windows = [seq_len if pattern[i % len(pattern)] == "L" or i == n_layer - 1 else short for i in range(n_layer)]
    attention = sum(12 * block.attn.c_q.out_features * min(w, seq_len) for block, w in zip(model.blocks, windows))
    return 6 * matmul_weights + attention


def test_flops_per_token_counts_converted_layers():
    """The plan's FLOPs/token includes the layers float8 replaced: checked against the converted model's own
    module shapes, not against titanlite's counting function."""
    model = GPT_on_meta()
    apply_float8(model, EMULATED, "cpu")
    converted = [m for m in model.modules() if isinstance(m, Float8Linear)]
    assert len(converted) == 13 and all(isinstance(m, nn.Linear) for m in converted)
    counted = textbook_flops_per_token(model, ARGS.sequence_len, ARGS.window_pattern)
    # the same number by hand for ARGS (C 64, 2 layers, vocab 512, T 32, every layer full):
    #   blocks 2 x 12 x 64^2 = 98,304; ve_gate (layer 1 only) 12 x 2 = 24; lm_head 512 x 64 = 32,768; smear 24
    #   -> 6 x 131,120 = 786,720;  attention 2 layers x 12 x (2 x 32) x 32 = 49,152
    assert counted == 6 * (98_304 + 24 + 32_768 + 24) + 2 * 12 * 64 * 32 == 835_872
    # what titanlite plans for the same architecture: depth 2, width 2 x 32 = 64, head_dim 32, T 32, pattern L
    plan = derive_plan(ModelConfig(depth=2, aspect_ratio=32, head_dim=32, max_seq_len=32, window_pattern="L"),
                       TrainingConfig(num_iterations=1, device_batch_size=1, total_batch_size=32),
                       OptimizerConfig(), ARGS.vocab_size, 1)
    assert plan.flops_per_token == counted


def test_filter_excludes_by_name_and_by_dims():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.ve_gate = nn.Linear(32, 32, bias=False)     # 16-aligned, excluded by name
            self.smear_gate = nn.Linear(32, 16, bias=False)  # 16-aligned, excluded by name
            self.odd = nn.Linear(32, 24, bias=False)         # excluded: 24 is not a multiple of 16
            self.big = nn.Linear(32, 48, bias=False)         # converted

    by_name = dataclasses.replace(EMULATED, exclude_fqns=["ve_gate", "smear_gate"])
    assert apply_float8(Toy(), by_name, "cpu") == ["big"]
    assert sorted(apply_float8(Toy(), dataclasses.replace(EMULATED, exclude_fqns=[]), "cpu")) == \
        ["big", "smear_gate", "ve_gate"]  # no names excluded: only the dims rule applies
    cfg = dataclasses.replace(EMULATED, exclude_fqns=["ve_gate", "smear_gate", "lm_head", "mlp"])
    converted = apply_float8(GPT_on_meta(), cfg, "cpu")
    assert sorted(converted) == [n for n in EXPECTED if "mlp" not in n and n != "lm_head"]


@torch.no_grad()
def randomize_matrices(model: nn.Module, seed: int = 3) -> None:
    """Zero-initialised projections give zero gradients upstream at init: give every matrix random values."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim == 2:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_forward_backward_close_to_fp32(recipe):
    ref = plain_model()
    model, _ = float8_model(dataclasses.replace(EMULATED, recipe=recipe))
    randomize_matrices(ref)
    randomize_matrices(model)
    idx, targets = batch()
    ref_loss = ref(idx, targets)
    loss = model(idx, targets)
    assert loss.item() != ref_loss.item()  # the fp8 path really ran
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < 0.02
    ref_loss.backward()
    loss.backward()
    ref_grads = {name: p.grad for name, p in ref.named_parameters()}
    for name, p in model.named_parameters():
        if name.removesuffix(".weight") in EXPECTED:
            cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), ref_grads[name].flatten(), dim=0)
            assert cos > 0.95, f"{name}: gradient cosine {cos:.3f}"


def test_bf16_eval_runs_the_same_weights_in_high_precision():
    ref = plain_model()
    model, _ = float8_model()
    idx, _ = batch(2)
    with torch.no_grad():
        expected = ref(idx)
        fp8 = model(idx)
        with bf16_eval(model):
            swapped = model(idx)
        after = model(idx)
    assert torch.equal(swapped, expected)
    assert not torch.equal(fp8, expected)
    assert torch.equal(after, fp8)  # restored on exit
    # restored to what was there: nothing, or the head's float8_forward (its fused loss)
    assert [n for n, m in model.named_modules() if "forward" in m.__dict__] == ["lm_head"]
    assert model.lm_head.forward.__func__ is Unembedding.float8_forward


def test_hardware_check():
    with pytest.raises(UserError, match="float8.emulate"):
        check_float8_hardware("cpu", emulate=False)
    with pytest.raises(UserError):
        apply_float8(GPT_on_meta(), Float8Config(enabled=True), "cpu")
    check_float8_hardware("cpu", emulate=True)  # tests may emulate


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a CUDA GPU with compute capability >= 8.9")
def test_real_float8_on_gpu():
    torch.manual_seed(0)
    ref = plain_model().cuda()
    # a CUDA world: the hardware check refuses real (non-emulated) float8 anywhere else
    gpu_world = dataclasses.replace(CPU_WORLD, device=torch.device("cuda", torch.cuda.current_device()))
    model, converted = float8_model(Float8Config(enabled=True), world=gpu_world)
    assert sorted(converted) == EXPECTED
    idx, targets = (t.cuda() for t in batch())
    ref.set_compute_dtype(torch.bfloat16)
    model.set_compute_dtype(torch.bfloat16)
    ref_loss, loss = ref(idx, targets), model(idx, targets)
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < 0.03
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    unfused = model(idx, targets, loss_reduction="none").mean()  # the float8 matmul's own logits
    assert abs(unfused.item() - loss.item()) / loss.item() < 0.01


# ---- the fused softcap + CE head on a float8 lm_head ----------------------------------------------------------

def count_fused_calls(monkeypatch) -> list:
    import titanlite.models.gpt.ops as ops_module

    calls = []
    real = ops_module._FusedSoftcapCrossEntropy.apply

    def counting(*args):
        calls.append(args[1].shape)
        return real(*args)

    monkeypatch.setattr(ops_module._FusedSoftcapCrossEntropy, "apply", counting)
    return calls


def reference_float8_head_loss(head, x, targets, softcap, vocab_size):
    """The head's loss written out: torchao's own float8 casts of x and the weight (straight-through), the plain
    matmul of what they dequantise to, softcap, and F.cross_entropy, in float64."""
    from torchao.float8.float8_scaling_utils import get_maybe_axiswise_dim, hp_tensor_to_float8_dynamic
    from torchao.float8.float8_training_tensor import GemmInputRole

    c = head.config

    def cast(t, cast_config, role, axis):
        fp8 = hp_tensor_to_float8_dynamic(
            t, cast_config.target_dtype, head.linear_mm_config, gemm_input_role=role,
            scaling_granularity=cast_config.scaling_granularity,
            axiswise_dim=get_maybe_axiswise_dim(axis, cast_config.scaling_granularity),
            round_scales_to_power_of_2=c.round_scales_to_power_of_2)
        return t.double() + (fp8.to_original_precision().double() - t.double()).detach()

    x_q = cast(x.reshape(-1, x.size(-1)), c.cast_config_input, GemmInputRole.INPUT, -1)
    w_q = cast(head.weight, c.cast_config_weight, GemmInputRole.WEIGHT, -1)
    logits = (x_q @ w_q.t())[:, :vocab_size]
    logits = softcap * torch.tanh(logits / softcap)
    return torch.nn.functional.cross_entropy(logits, targets.reshape(-1), ignore_index=-1)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fused_head_runs_on_a_float8_lm_head(recipe, monkeypatch):
    model, converted = float8_model(dataclasses.replace(EMULATED, recipe=recipe))
    assert "lm_head" in converted
    randomize_matrices(model)
    idx, targets = batch()
    targets[0, :5] = -1  # ignored positions take part too
    calls = count_fused_calls(monkeypatch)

    # the last normed stream, detached so the head's own gradients can be compared
    captured = {}

    def keep_input(module, args):
        captured.setdefault("x", args[0].detach())  # returns None: the call's inputs stay as they are

    hook = model.lm_head.register_forward_pre_hook(keep_input)
    loss = model(idx, targets)
    hook.remove()
    assert len(calls) == 1  # the fused head ran, on the float8 lm_head

    x = captured["x"].clone().requires_grad_(True)
    fused = model.lm_head(x, targets=targets, softcap=ARGS.softcap, vocab_size=ARGS.vocab_size)
    torch.testing.assert_close(fused, loss)
    gx, gw = torch.autograd.grad(fused, (x, model.lm_head.weight))
    # 1) against the head written out with torchao's casts: same loss and gradients (float32 rounding only)
    x64 = captured["x"].clone().requires_grad_(True)
    ref = reference_float8_head_loss(model.lm_head, x64, targets, ARGS.softcap, ARGS.vocab_size)
    ref_gx, ref_gw = torch.autograd.grad(ref, (x64, model.lm_head.weight))
    assert abs(fused.item() - ref.item()) < 1e-5 * ref.item()
    torch.testing.assert_close(gx.double(), ref_gx.double(), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(gw.double(), ref_gw.double(), atol=1e-7, rtol=1e-4)

    # 2) against the unfused float8 path (full logits through torchao's float8 matmul, then F.cross_entropy)
    x2 = captured["x"].clone().requires_grad_(True)
    logits = model.lm_head(x2)[..., :ARGS.vocab_size].float()
    logits = ARGS.softcap * torch.tanh(logits / ARGS.softcap)
    unfused = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                                ignore_index=-1)
    ugx, ugw = torch.autograd.grad(unfused, (x2, model.lm_head.weight))
    assert len(calls) == 2  # the direct call above; plain logits never take the fused path
    assert abs(fused.item() - unfused.item()) < 1e-5 * unfused.item()  # the same float8 forward
    # torchao's backward also casts the logit gradient to float8; the fused head keeps it exact
    for got, want in ((gx, ugx), (gw, ugw)):
        cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
        assert cos > 0.99, f"gradient cosine {cos:.4f}"
        assert (got - want).norm() < 0.15 * want.norm()


def test_whole_model_grads_with_fused_float8_head_match_unfused(monkeypatch):
    model, _ = float8_model()
    randomize_matrices(model)
    idx, targets = batch()
    calls = count_fused_calls(monkeypatch)
    model(idx, targets).backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(idx, targets, loss_reduction="none").mean().backward()  # reduction none: the unfused float8 head
    assert len(calls) == 1
    # the head's logit gradient differs by torchao's float8 cast of it (unfused) and flows into every layer; a
    # gradient that cancels to ~0 (backout_lambda's is 1e-8 here) is all noise and carries no direction
    compared = [n for n, p in model.named_parameters() if p.grad.norm() > 1e-6]
    assert len(compared) >= 18
    for name in compared:
        got, want = fused[name].flatten(), model.get_parameter(name).grad.flatten()
        cos = torch.nn.functional.cosine_similarity(got, want, dim=0)
        assert cos > 0.98, f"{name}: gradient cosine {cos:.4f}"
