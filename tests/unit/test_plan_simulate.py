"""plan --simulate's batch search and ladder on a stand-in for the simulated step whose peak is known in closed
form (static + per-sequence bytes x device batch), so the answer is hand arithmetic. The simulated step itself is
tested in tests/dist/test_simulate.py."""

import pytest

from titanlite import plan_simulate
from titanlite.config import load_config
from titanlite.simulate import GIB, SimResult, gpu_allowance

STATIC = 3 * GIB
PER_SEQUENCE = {"none": 3.5 * GIB, "full": 0.6 * GIB}  # activation bytes per sequence of the device batch


def fake_simulate(calls):
    def simulate(config, world_size, *, micro_steps=None, rank=0):
        b, mode = config.training.device_batch_size, config.activation_checkpoint.mode
        depth_scale = config.model.depth / 26
        peak = int(STATIC * depth_scale + PER_SEQUENCE[mode] * depth_scale * b)
        calls.append((config.model.depth, mode, b))
        return SimResult(world_size=world_size, rank=rank, dp_replicate=1, dp_shard=world_size,
                         device_batch_size=b, ac_mode=mode, micro_steps=2, plan_micro_steps=4, peak_bytes=peak,
                         breakdown={}, seconds=0.0, static_bytes={"parameters": int(STATIC * depth_scale)})
    return simulate


def fits_by_hand(depth, mode, b, gpu_gib):
    peak = int(STATIC * depth / 26 + PER_SEQUENCE[mode] * depth / 26 * b)
    return peak + gpu_allowance(peak) <= gpu_gib * GIB


@pytest.mark.parametrize("guess", [1, 16, 64])
def test_largest_fitting_batch_is_the_hand_answer_from_any_start(monkeypatch, guess):
    calls = []
    monkeypatch.setattr(plan_simulate, "simulate_step", fake_simulate(calls))
    config = load_config(["--job.config_file", "gpt2_d26.toml"])
    # 2^20 tokens over 8 ranks x 2048: device batches 1, 2, 4, ..., 64 tile it
    assert plan_simulate.batch_candidates(config, 8) == [1, 2, 4, 8, 16, 32, 64]
    for mode in ("none", "full"):
        best, runs = plan_simulate.largest_fitting_batch(config, 8, 80 * GIB, mode, guess)
        expected = max(b for b in (1, 2, 4, 8, 16, 32, 64) if fits_by_hand(26, mode, b, 80))
        assert best == expected and best in runs
    # 3 + 3.5 b + 2 GiB + 5%: 16 fits (63.0 GiB), 32 does not (122 GiB); full AC: all up to 64 fit (45.5 GiB)
    assert fits_by_hand(26, "none", 16, 80) and not fits_by_hand(26, "none", 32, 80)
    assert fits_by_hand(26, "full", 64, 80)


def test_nothing_fits_returns_none(monkeypatch):
    monkeypatch.setattr(plan_simulate, "simulate_step", fake_simulate([]))
    config = load_config(["--job.config_file", "gpt2_d26.toml"])
    best, _ = plan_simulate.largest_fitting_batch(config, 8, 4 * GIB, "none", 16)
    assert best is None


def test_ladder_stops_at_the_first_depth_that_does_not_fit(monkeypatch):
    calls = []
    monkeypatch.setattr(plan_simulate, "simulate_step", fake_simulate(calls))
    config = load_config(["--job.config_file", "gpt2_d26.toml"])
    text = plan_simulate.ladder_report(config, 8, "h100", 24, 0.4, 989e12)
    # 24 GiB: full AC at batch 1 needs (3 + 0.6) d/26 GiB + 2 GiB + 5% -> fits up to d/26 <= 5.8, i.e. all of
    # d12..d48 by the static part; no AC at batch 1: (3 + 3.5) d/26 + 2 + 5% <= 24 up to d = 83: all fit too
    assert "deepest that fits: d48" in text
    text = plan_simulate.ladder_report(config, 8, "h100", 8, 0.4, 989e12)
    deepest = max(d for d in plan_simulate.LADDER_DEPTHS if fits_by_hand(d, "full", 1, 8))
    assert f"deepest that fits: d{deepest} " in text and "none fits" in text
