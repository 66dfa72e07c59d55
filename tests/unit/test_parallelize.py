"""parallelize_gpt on one process: activation checkpointing, compile, materialize; distributed.py basics."""

import dataclasses

import pytest
import torch

from titanlite.config.sections import ActivationCheckpointConfig, CompileConfig, Float8Config, ParallelismConfig
from titanlite.distributed import WorldInfo, all_reduce_sum, init_distributed, resolve_degrees
from titanlite.errors import UserError
from titanlite.models.gpt.model import GPT, GPTArgs
from titanlite.models.gpt.parallelize import parallelize_gpt
from titanlite.parallelize import apply_ac, compile_enabled, materialize

ARGS = GPTArgs(n_layer=2, n_embd=64, n_head=2, n_kv_head=2, head_dim=32, vocab_size=512, sequence_len=32,
               window_pattern="L", attention_backend="sdpa")
CPU_WORLD = WorldInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), mesh=None, dp_shard=1,
                      dp_replicate=1)
NO_COMPILE = CompileConfig(enabled="false")



def meta_model(args: GPTArgs = ARGS) -> GPT:
    with torch.device("meta"):
        return GPT(args)


def build(args: GPTArgs = ARGS, compile_cfg=NO_COMPILE, ac_mode: str = "none", every: int = 2) -> GPT:
    model = parallelize_gpt(meta_model(args), CPU_WORLD, compile_cfg, Float8Config(),
                            ActivationCheckpointConfig(mode=ac_mode, selective_every=every))
    torch.manual_seed(0)
    model = materialize(model, "cpu")
    randomize(model)
    return model


@torch.no_grad()
def randomize(model) -> None:
    """Zero-initialised projections would hide most of the backward: give every matrix random values."""
    g = torch.Generator().manual_seed(5)
    for p in model.parameters():
        if p.ndim == 2:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def loss_and_grads(model) -> tuple[float, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    idx, targets = torch.randint(0, 512, (2, 32), generator=g), torch.randint(0, 512, (2, 32), generator=g)
    loss = model(idx, targets)
    loss.backward()
    return loss.item(), {n.replace("_orig_mod.", ""): p.grad.clone() for n, p in model.named_parameters()}


def test_materialize_draws_the_recipe_init_from_the_run_seed():
    """Per-name seeded fills keep the recipe's distributions (std 0.8 wte, 0.001 head, U(+-sqrt(3/C)) q/k/v,
    zero projections, the lambda ramps), repeat for a seed and change with it."""
    torch.manual_seed(0)
    model = materialize(meta_model(), "cpu")
    C = ARGS.n_embd
    bound = (3 / C) ** 0.5
    assert abs(model.wte.weight.std().item() - 0.8) < 0.02  # 32k samples: the std estimate is within ~1%
    assert abs(model.lm_head.weight.std().item() - 0.001) < 0.00003
    q = model.blocks[0].attn.c_q.weight
    assert q.abs().max() <= bound and abs(q.std().item() - C ** -0.5) < 0.03 * C ** -0.5
    assert not model.blocks[0].attn.c_proj.weight.any() and not model.blocks[1].mlp.c_proj.weight.any()
    assert torch.allclose(model.resid_lambdas, torch.tensor([1.15, 1.05]))
    assert torch.allclose(model.x0_lambdas, torch.tensor([0.20, 0.05]))
    assert model.backout_lambda.item() == pytest.approx(0.2) and model.rope_cos.abs().sum() > 0
    torch.manual_seed(0)
    again = materialize(meta_model(), "cpu")
    torch.manual_seed(1)
    other = materialize(meta_model(), "cpu")
    random_fills = {"wte.weight", "lm_head.weight", "smear_gate.weight", "blocks.0.attn.c_q.weight",
                    "blocks.1.mlp.c_fc.weight", "value_embeds.1.weight"}
    for (name, a), b, c in zip(model.named_parameters(), again.parameters(), other.parameters()):
        assert torch.equal(a, b), name
        assert torch.equal(a, c) == (name not in random_fills and not name.endswith(("c_q.weight", "c_k.weight",
                                                                                     "c_v.weight", "c_fc.weight",
                                                                                     "ve_gate.weight"))), name


@pytest.mark.parametrize("mode,every,expected", [("none", 2, []), ("full", 2, [0, 1, 2]), ("selective", 2, [0, 2]),
                                                 ("selective", 3, [0])])
def test_ac_modes_choose_blocks(mode, every, expected):
    model = meta_model(dataclasses.replace(ARGS, n_layer=3))
    names = [n for n, _ in model.named_parameters()]
    assert apply_ac(model, ActivationCheckpointConfig(mode=mode, selective_every=every)) == expected
    assert [n for n, _ in model.named_parameters()] == names  # checkpoints stay interchangeable


def test_ac_bad_values_are_user_errors():
    with pytest.raises(UserError, match="selective_every"):
        apply_ac(meta_model(), ActivationCheckpointConfig(mode="selective", selective_every=0))
    with pytest.raises(UserError, match="activation_checkpoint.mode"):
        apply_ac(meta_model(), ActivationCheckpointConfig(mode="sometimes"))


def test_full_ac_gives_the_same_loss_and_gradients():
    ref_loss, ref_grads = loss_and_grads(build())
    loss, grads = loss_and_grads(build(ac_mode="full"))
    assert loss == ref_loss
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_compile_switch():
    assert compile_enabled(CompileConfig(enabled="auto"), "cuda") is True
    assert compile_enabled(CompileConfig(enabled="auto"), "cpu") is False
    assert compile_enabled(CompileConfig(enabled="true"), "cpu") is True
    assert compile_enabled(CompileConfig(enabled=False), "cuda") is False  # a TOML boolean
    with pytest.raises(UserError, match="compile.enabled"):
        compile_enabled(CompileConfig(enabled="maybe"), "cpu")


def test_auto_compile_on_cpu_only_where_it_pays_back():
    """auto on CPU: the whole model for a one-process bf16 run estimated at 30+ min eagerly, i.e. training FLOPs
    of at least 0.5 x peak x 1800 s; off for shorter, fp32 or multi-process runs; auto on CUDA: per block."""
    from titanlite.parallelize import resolve_compile

    peak = 4.0e11
    at_threshold = 0.5 * peak * 1800  # FLOPs an eager run at half the peak trains in exactly 30 min
    auto = CompileConfig(enabled="auto")

    def choose(device="cpu", processes=1, dtype=torch.bfloat16, flops=at_threshold, cfg=auto):
        resolved, line = resolve_compile(cfg, device, processes=processes, compute_dtype=dtype,
                                         train_flops=flops, peak_flops=peak)
        return resolved.enabled, resolved.scope, line

    enabled, scope, line = choose()
    assert (enabled, scope) == ("true", "model") and "whole model" in line and "about 30 min" in line
    enabled, _, line = choose(flops=0.9 * at_threshold)
    assert enabled == "false" and "about 27.0 min" in line and "--compile.enabled=true" in line
    assert choose(dtype=torch.float32, flops=10 * at_threshold)[0] == "false"
    assert choose(processes=2, flops=10 * at_threshold)[:2] == ("false", "blocks")
    assert choose(device="cuda", flops=0.0)[:3] == ("true", "blocks", None)
    # explicit choices are kept, with scope auto settled: the whole model on one CPU process, blocks with FSDP
    assert choose(cfg=CompileConfig(enabled="true"), flops=0.0)[:2] == ("true", "model")
    assert choose(cfg=CompileConfig(enabled="true"), processes=2, flops=0.0)[:2] == ("true", "blocks")
    assert choose(cfg=CompileConfig(enabled="false"), flops=10 * at_threshold)[:3] == ("false", "model", None)
    with pytest.raises(UserError, match="compile.scope"):
        choose(cfg=CompileConfig(enabled="true", scope="layers"))


def test_compiled_block_matches_eager():
    """The one compile test (cold compile ~20-40 s): a depth-1 model, AC on, compiled block vs eager."""
    args = dataclasses.replace(ARGS, n_layer=1)
    ref_loss, ref_grads = loss_and_grads(build(args))
    model = build(args, compile_cfg=CompileConfig(enabled="true", scope="blocks"), ac_mode="full")
    assert type(model.blocks[0]).__name__ == "OptimizedModule"
    loss, grads = loss_and_grads(model)
    assert abs(loss - ref_loss) <= 1e-4 * abs(ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_whole_model_compile_matches_eager():
    """compile.scope = model: one graph for the whole forward (embeddings, scalars, the fused head included);
    loss and every gradient equal the eager model's with the same weights, to fp32 reordering noise."""
    args = dataclasses.replace(ARGS, n_layer=1)
    ref_loss, ref_grads = loss_and_grads(build(args))
    model = build(args, compile_cfg=CompileConfig(enabled="true", scope="model"))
    assert type(model) is GPT and type(model.blocks[0]).__name__ != "OptimizedModule"  # names unchanged
    assert model._compiled_call_impl is not None
    loss, grads = loss_and_grads(model)
    assert abs(loss - ref_loss) <= 1e-4 * abs(ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        # the scalars' gradients are sums of many terms that nearly cancel: reordering moves them more
        torch.testing.assert_close(grads[name], grad, rtol=1e-3 if grad.numel() == 1 else 1e-4, atol=1e-5,
                                   msg=name)


def test_whole_model_compile_refuses_fsdp():
    from titanlite.parallelize import apply_compile

    with pytest.raises(UserError, match="compile.scope = model .* single process"):
        apply_compile(meta_model(), "model", sharded=True)


def test_gpt_spec_uses_parallelize_gpt():
    from titanlite.models import get_train_spec

    assert get_train_spec("gpt").parallelize is parallelize_gpt


# ----- distributed.py without torchrun -----------------------------------------------------------------------

def test_single_process_world_has_no_mesh(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    world = init_distributed(ParallelismConfig(), "cpu")
    assert (world.rank, world.world_size, world.mesh, world.dp_shard, world.dp_replicate) == (0, 1, None, 1, 1)
    assert world.device == torch.device("cpu")
    t = torch.tensor([2.0])
    assert all_reduce_sum(t) is t and t.item() == 2.0
    world.barrier()  # no-op


def test_degrees():
    assert resolve_degrees(8, -1, 1) == (1, 8)
    assert resolve_degrees(8, -1, 2) == (2, 4)
    assert resolve_degrees(8, 4, 2) == (2, 4)
    with pytest.raises(UserError, match="world size is 8"):
        resolve_degrees(8, 3, 2)
    with pytest.raises(UserError, match="does not divide"):
        resolve_degrees(6, -1, 4)
    with pytest.raises(UserError, match="dp_replicate"):
        resolve_degrees(2, -1, 0)
    with pytest.raises(UserError, match="parallelism.dp_shard"):
        init_distributed(ParallelismConfig(dp_shard=2), "cpu")
