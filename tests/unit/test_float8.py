"""Float8 conversion (torchao, emulated on CPU): which modules swap, the filter, numerics, the eval swap-back."""

import dataclasses

import pytest
import torch
import torch.nn as nn

from titanlite.config.sections import ActivationCheckpointConfig, CompileConfig, Float8Config
from titanlite.distributed import WorldInfo
from titanlite.errors import UserError
from titanlite.float8 import apply_float8, bf16_eval, check_float8_hardware, float8_modules
from titanlite.models.gpt.model import GPT, GPTArgs
from titanlite.models.gpt.parallelize import materialize, parallelize_gpt

pytest.importorskip("torchao.float8")

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


def float8_model(cfg: Float8Config = EMULATED, seed: int = 0) -> tuple[GPT, list[str]]:
    """The trainer's path: convert on meta inside parallelize_gpt, then materialize."""
    model = parallelize_gpt(GPT_on_meta(), CPU_WORLD, CompileConfig(enabled="false"), cfg,
                            ActivationCheckpointConfig())
    converted = [name for name, m in model.named_modules() if any(m is f for f in float8_modules(model))]
    torch.manual_seed(seed)
    return materialize(model, "cpu"), converted


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


def test_flops_per_token_counts_converted_layers():
    model, _ = float8_model()
    assert model.flops_per_token() == plain_model().flops_per_token()


def test_filter_excludes_by_name_and_by_dims():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.ve_gate = nn.Linear(32, 32, bias=False)     # 16-aligned, excluded by name
            self.smear_gate = nn.Linear(32, 16, bias=False)  # 16-aligned, excluded by name
            self.odd = nn.Linear(32, 24, bias=False)         # excluded: 24 is not a multiple of 16
            self.big = nn.Linear(32, 48, bias=False)         # converted

    assert apply_float8(Toy(), EMULATED, "cpu") == ["big"]
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
    assert all("forward" not in m.__dict__ for m in float8_modules(model))


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
    model, converted = float8_model(Float8Config(enabled=True))
    model = model.cuda()
    assert sorted(converted) == EXPECTED
    idx, targets = (t.cuda() for t in batch())
    ref.set_compute_dtype(torch.bfloat16)
    model.set_compute_dtype(torch.bfloat16)
    ref_loss, loss = ref(idx, targets), model(idx, targets)
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < 0.03
    loss.backward()
