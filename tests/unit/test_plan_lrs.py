"""The per-group LRs the plan prints are the LRs the optimizers start with (read from both sides)."""

import re
from dataclasses import replace

from titanlite.config.sections import ModelConfig, OptimizerConfig, TrainingConfig
from titanlite.models import get_train_spec
from titanlite.optim import build_optimizers
from titanlite.scaling import derive_plan, format_plan


def test_printed_group_lrs_equal_optimizer_param_group_lrs():
    model_cfg = replace(ModelConfig(), depth=2, aspect_ratio=64, head_dim=64, max_seq_len=64)
    training = replace(TrainingConfig(), device_batch_size=2, total_batch_size=256, num_iterations=3)
    optim = OptimizerConfig()
    plan = derive_plan(model_cfg, training, optim, 512, 1)
    line = next(l for l in format_plan(plan).splitlines() if "group LRs" in l)
    printed = {name: float(value) for name, value in re.findall(r"(\w+) ([0-9.e+-]+)(?= \||$| \()", line)}

    spec = get_train_spec("gpt")
    model = spec.build_meta_model(plan.model_args).to_empty(device="cpu")
    model.init_weights()
    optimizers = build_optimizers(model.optimizer_param_groups(), optim, plan)
    used = {}
    for group in optimizers.param_groups:
        name = "matrices" if group["name"].startswith("matrices_") else group["name"]
        used.setdefault(name, set()).add(group["initial_lr"])
    assert set(printed) == set(used)
    for name, lrs in used.items():
        assert len(lrs) == 1  # Muon's per-shape factor is applied at step time, not stored in initial_lr
        assert abs(printed[name] - lrs.pop()) <= 1e-5 * max(printed[name], 1e-12), name
