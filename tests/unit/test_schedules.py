import dataclasses
import math

import pytest

from titanlite.config.sections import LRSchedulerConfig
from titanlite.errors import UserError
from titanlite.optim.schedules import TrainingSchedule

# The recipe's d24 speedrun settings (docs/recipe.md §4): 40 warmup steps, 65 % warmdown to 5 %, N = 5568.
RECIPE_D24 = LRSchedulerConfig(warmup_steps=40, warmdown_ratio=0.65, final_lr_frac=0.05)


def test_recipe_d24_lr_multiplier_values():
    s = TrainingSchedule(RECIPE_D24, 5568)
    assert s.warmdown_steps == 3619 and s.warmdown_start == 1949
    assert s.lr_multiplier(0) == pytest.approx(0.025, abs=1e-12)
    assert s.lr_multiplier(39) == 1.0
    assert s.lr_multiplier(40) == 1.0
    assert s.lr_multiplier(1949) == 1.0  # warmdown starts right after this step
    assert s.lr_multiplier(1950) < 1.0
    assert s.lr_multiplier(3000) == pytest.approx(0.7241, abs=5e-5)
    assert s.lr_multiplier(5567) == pytest.approx(0.05 + 0.95 / 3619, abs=1e-12)
    assert round(s.lr_multiplier(5567), 5) == 0.05026


def test_recipe_d24_momentum_and_weight_decay_values():
    s = TrainingSchedule(RECIPE_D24, 5568)
    assert s.muon_momentum(0) == pytest.approx(0.85)
    assert s.muon_momentum(200) == pytest.approx(0.91)
    assert s.muon_momentum(400) == pytest.approx(0.97)
    assert s.muon_momentum(1949) == pytest.approx(0.97)
    assert s.muon_momentum(5567) == pytest.approx(0.97 - 0.07 * 3618 / 3619, abs=1e-12)
    assert round(s.muon_momentum(5567), 5) == 0.90002
    assert s.muon_weight_decay_factor(0) == 1.0
    assert s.muon_weight_decay_factor(3000) == pytest.approx(0.4392, abs=5e-5)
    assert s.muon_weight_decay_factor(2784) == pytest.approx(0.5)


def test_seed_defaults_use_ratios():
    # Seed defaults: no warmup, 50 % warmdown to 0.
    s = TrainingSchedule(LRSchedulerConfig(), 100)
    assert s.warmup_steps == 0 and s.warmdown_steps == 50
    assert s.lr_multiplier(0) == 1.0
    assert s.lr_multiplier(50) == 1.0
    assert s.lr_multiplier(51) == pytest.approx(49 / 50)
    assert s.lr_multiplier(99) == pytest.approx(1 / 50)


def test_warmup_ratio_rounds_and_warmup_steps_override():
    s = TrainingSchedule(LRSchedulerConfig(warmup_ratio=0.1, warmdown_ratio=0.0), 25)
    assert s.warmup_steps == 2  # round(2.5) == 2 (Python rounds halves to even, as the reference does)
    assert s.lr_multiplier(0) == 0.5 and s.lr_multiplier(1) == 1.0 and s.lr_multiplier(24) == 1.0
    s = TrainingSchedule(LRSchedulerConfig(warmup_ratio=0.5, warmup_steps=4), 100)
    assert s.warmup_steps == 4 and s.lr_multiplier(3) == 1.0 and s.lr_multiplier(2) == 0.75


def test_momentum_warmup_has_priority_over_warmdown():
    cfg = LRSchedulerConfig(warmdown_ratio=0.5, momentum_warmup_steps=400)
    s = TrainingSchedule(cfg, 100)  # whole run inside the momentum warmup
    assert s.muon_momentum(99) == pytest.approx(0.85 * (1 - 99 / 400) + 0.97 * 99 / 400)
    s = TrainingSchedule(dataclasses.replace(cfg, momentum_warmup_steps=0), 100)
    assert s.muon_momentum(10) == pytest.approx(0.97)
    assert s.muon_momentum(75) == pytest.approx(0.97 - 0.07 * 0.5)


def test_zero_warmdown_keeps_peak_lr_and_momentum():
    s = TrainingSchedule(LRSchedulerConfig(warmdown_ratio=0.0, momentum_warmup_steps=0), 10)
    assert [s.lr_multiplier(i) for i in range(10)] == [1.0] * 10
    assert s.muon_momentum(9) == pytest.approx(0.97)


def test_weight_decay_schedules():
    linear = TrainingSchedule(LRSchedulerConfig(muon_wd_schedule="linear"), 200)
    assert linear.muon_weight_decay_factor(50) == pytest.approx(0.75)
    constant = TrainingSchedule(LRSchedulerConfig(muon_wd_schedule="constant"), 200)
    assert constant.muon_weight_decay_factor(199) == 1.0
    cosine = TrainingSchedule(LRSchedulerConfig(), 200)
    assert cosine.muon_weight_decay_factor(50) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_state_dict_round_trip_and_bad_values():
    s = TrainingSchedule(RECIPE_D24, 5568)
    other = TrainingSchedule(RECIPE_D24, 5568)
    other.load_state_dict(s.state_dict())
    assert other.state_dict() == {"num_iterations": 5568, "warmup_steps": 40, "warmdown_steps": 3619}
    with pytest.raises(UserError, match="horizon"):
        TrainingSchedule(RECIPE_D24, 0)
    with pytest.raises(UserError, match="warmdown_ratio"):
        TrainingSchedule(LRSchedulerConfig(warmdown_ratio=1.5), 10)
