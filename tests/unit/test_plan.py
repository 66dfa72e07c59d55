"""The planner: same plan as the trainer, and an activation estimate that matches measured CPU memory."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from titanlite import plan as planner
from titanlite.config import load_config
from titanlite.scaling import derive_plan, format_plan

REPO = Path(__file__).resolve().parents[2]

# Reference numbers (nanochat_recipe.md §2.3, vocab 32768): total params, scaling params, FLOPs/token.
REFERENCE = {12: (286_261_730, 110_100_912, 7.5970e8), 20: (896_533_746, 435_160_240, 2.8862e9),
             26: (1_681_786_938, 918_423_532, 5.9911e9)}


@pytest.mark.parametrize("depth,config_file,world", [(12, "d12.toml", 1), (20, "d20.toml", 8),
                                                     (26, "gpt2_d26.toml", 8)])
def test_planner_prints_the_trainers_plan(depth, config_file, world, capsys):
    argv = ["--job.config_file", f"train_configs/{config_file}", "--data.vocab_size=32768"]
    assert planner.main(argv + ["--world-size", str(world), "--mfu", "0.5"]) == 0
    out = capsys.readouterr().out
    config = load_config(argv)
    plan = derive_plan(config.model, config.training, config.optimizer, 32768, world)
    assert format_plan(plan) in out  # the very block the trainer logs at start
    total, scaling, flops = REFERENCE[depth]
    assert plan.params["total"] == total and plan.scaling_params == scaling
    assert plan.flops_per_token == pytest.approx(flops, rel=1e-4)
    hours = plan.total_flops / (0.5 * 989e12 * world) / 3600
    assert f"{hours:.2f} h" in out and "activations, no AC" in out


def test_memory_terms_shard_and_checkpointing():
    config = load_config(["--job.config_file", "train_configs/gpt2_d26.toml", "--data.vocab_size=32768"])
    plan = derive_plan(config.model, config.training, config.optimizer, 32768, 8)
    one = planner.estimate_memory(plan, 2, 1)
    eight = planner.estimate_memory(plan, 2, 8, compiled=True)
    total = plan.params["total"]
    assert one.parameters == 4 * total and eight.parameters == 4 * total // 8
    assert eight.gradients == one.gradients // 8
    matrices = plan.params["transformer_matrices"]
    assert one.optimizer_states > 4 * (2 * (total - matrices) + matrices)  # + NorMuon second moments
    assert one.activations_ac < one.activations / 4 and eight.activations < one.activations  # compiled saves less
    # the question the planner exists for: d26 at device batch 16 on 8 x H100 80 GiB (compiled, bf16)
    assert eight.total / 2**30 < 0.92 * 80


MEASURE = r"""
import json, re, sys, torch
from titanlite.config import load_config
from titanlite.parallelize import apply_ac, materialize
from titanlite.scaling import derive_plan
from titanlite.models import get_train_spec

def rss_kib(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1))

torch.set_num_threads(1)
torch.manual_seed(0)
out = []
for argv in json.loads(sys.argv[1]):
    cfg = load_config(argv)
    plan = derive_plan(cfg.model, cfg.training, cfg.optimizer, cfg.data.vocab_size, 1)
    model = get_train_spec("gpt").build_meta_model(plan.model_args)
    apply_ac(model, cfg.activation_checkpoint)
    model = materialize(model, "cpu")
    B, T = plan.device_batch_size, plan.seq_len
    x = torch.randint(0, plan.vocab_size, (B, T)); y = torch.randint(0, plan.vocab_size, (B, T))
    for _ in range(2):  # warm-up: caches (masks, RoPE casts) and the allocator's steady state
        model(x, y, loss_reduction="sum").backward()
        model.zero_grad(set_to_none=True)
    base = rss_kib("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM, the peak resident set
    model(x, y, loss_reduction="sum").backward()
    grads = sum(p.grad.numel() * 4 for p in model.parameters())
    out.append({"peak_minus_base": (rss_kib("VmHWM") - base) * 1024, "grads": grads})
    del model
print(json.dumps(out))
"""

SMALL = ["--model.depth=2", "--model.aspect_ratio=64", "--model.head_dim=64", "--model.max_seq_len=256",
         "--model.window_pattern=SL", "--training.device_batch_size=8", "--data.vocab_size=1024"]
SMALL_AC = ["--model.depth=4", "--model.aspect_ratio=32", "--model.head_dim=64", "--model.max_seq_len=128",
            "--model.window_pattern=SL", "--training.device_batch_size=16", "--data.vocab_size=2048",
            "--activation_checkpoint.mode=full"]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_activation_estimate_matches_measured_cpu_peak():
    configs = [c + ["--training.device_type=cpu", "--training.dtype=float32", "--compile.enabled=false",
                    "--training.total_batch_size=-1"] for c in (SMALL, SMALL_AC)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1",  # big tensors return to the OS
               TORCHAO_FORCE_SKIP_LOADING_SO_FILES="1")
    proc = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(configs)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    for argv, m in zip(configs, measured):
        cfg = load_config(argv)
        plan = derive_plan(cfg.model, cfg.training, cfg.optimizer, cfg.data.vocab_size, 1)
        ckpt = planner.checkpointed_blocks(plan.n_layer, cfg.activation_checkpoint.mode, 1)
        estimate = planner.activation_bytes(plan, 4, ckpt, fused_head=True, device_type="cpu")
        actual = m["peak_minus_base"] - m["grads"]  # the planner counts gradients separately
        assert abs(estimate - actual) / actual < 0.25, (argv, estimate, actual)
