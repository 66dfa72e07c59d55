"""Finding 9 of issue 24: the automatic total batch fits any world size (the planner adjusts and says so); a
batch the user set that does not divide stops with one line naming the setting that works."""

from dataclasses import replace

import pytest

from titanlite.config.sections import ModelConfig, OptimizerConfig, TrainingConfig
from titanlite.errors import UserError
from titanlite.scaling import derive_plan, format_plan

D26 = replace(ModelConfig(), depth=26)  # auto batch 2^20 (docs/recipe.md §2.3), T = 2048
TRAIN = TrainingConfig(target_param_data_ratio=8.25, device_batch_size=16)


def plan_at(world, **training):
    return derive_plan(D26, replace(TRAIN, **training), OptimizerConfig(), 32768, world)


def test_auto_batch_unchanged_where_it_divides():
    p = plan_at(8)  # 2^20 / (16 x 2048 x 8) = 4 micro-steps
    assert (p.total_batch_size, p.device_batch_size, p.grad_accum_steps, p.batch_note) == (2 ** 20, 16, 4, "")


def test_auto_batch_lowers_the_device_batch_at_64_ranks():
    p = plan_at(64)  # 16 x 2048 x 64 = 2^21 > 2^20: 8 sequences per rank tile 2^20 exactly once
    assert (p.total_batch_size, p.device_batch_size, p.grad_accum_steps) == (2 ** 20, 8, 1)
    assert "device batch 16 -> 8" in p.batch_note and "batch fitted" in format_plan(p)


def test_auto_batch_rises_to_one_sequence_per_rank_at_1024_ranks():
    p = plan_at(1024)  # 2048 x 1024 = 2^21 tokens is the smallest step; 2^20 cannot be split over 1,024 ranks
    assert (p.total_batch_size, p.device_batch_size, p.grad_accum_steps) == (2 ** 21, 1, 1)
    assert "raised to 2,097,152 tokens" in p.batch_note
    assert p.batch_lr_scale == pytest.approx(2.0)  # sqrt(2^21 / 2^19): the LRs follow the batch actually used


def test_auto_batch_at_a_world_that_is_not_a_power_of_two():
    p = plan_at(3)  # 2048 x 3 = 6,144 never divides 2^20: the next multiple is ceil(2^20 / 6144) x 6144
    assert p.total_batch_size == 171 * 6144 and p.total_batch_size % (p.device_batch_size * 6144) == 0


def test_user_batch_that_does_not_divide_names_the_setting():
    with pytest.raises(UserError, match=r"set --training.device_batch_size=8$"):
        plan_at(64, total_batch_size=2 ** 20)
    with pytest.raises(UserError, match=r"set --training.total_batch_size=2097152 "):
        plan_at(1024, total_batch_size=2 ** 20)


def test_oom_advice_names_the_simulated_batch(tmp_path, monkeypatch):
    """Issue 24 point 5: after `plan --simulate` the out-of-memory line names the batch the simulation found."""
    import torch

    from titanlite.config import load_config
    from titanlite.device import out_of_memory_message
    from titanlite.plan_simulate import remember_fit, remembered_fit

    monkeypatch.setenv("TITANLITE_HOME", str(tmp_path))
    config = load_config(["--job.config_file", "gpt2_d26.toml"])
    assert remembered_fit(config, 8, 79.1) is None
    remember_fit(config, 8, 80, {"none": 16, "full": 64})
    fit = remembered_fit(config, 8, 79.1)  # an 80 GB H100 reports 79.1 GiB
    assert fit == {"none": 16, "full": 64} and remembered_fit(config, 64, 79.1) is None
    assert remembered_fit(config, 8, 139.8) is None  # another GPU size
    line = out_of_memory_message(32, torch.device("cuda", 0), fit)
    assert line.endswith("the simulation says --training.device_batch_size=16 fits (64 with "
                         "--activation_checkpoint.mode=full)")
    line = out_of_memory_message(16, torch.device("cuda", 0), {"none": None, "full": 8})
    assert line.endswith("--training.device_batch_size=8 --activation_checkpoint.mode=full fits")
    line = out_of_memory_message(32, torch.device("cuda", 0), None, "python -m titanlite.plan --simulate X")
    assert "device_batch_size=16 " in line and line.endswith("`python -m titanlite.plan --simulate X` finds the "
                                                             "largest that fits")
