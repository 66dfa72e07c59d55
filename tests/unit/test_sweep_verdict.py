"""The dial's verdict: which depth target_param_data_ratio trains for a budget, and its gap on the fitted curve."""

import math

import pytest

from titanlite.config import load_config
from titanlite.sweep.fit import SweepPoint, fit_isoflop
from titanlite.sweep.verdict import dial_choice, dial_flops_by_depth


def test_dial_cost_per_depth_is_the_ratio_horizon_in_whole_steps():
    config = load_config(["--job.config_file", "sweep_cpu.toml"])
    ratio = 10.5
    by_depth = dial_flops_by_depth(config, vocab_size=1024, world_size=1, ratio=ratio)
    batch = 2048  # sweep_cpu.toml's total_batch_size
    for depth in (2, 5):
        params, flops = by_depth[depth]
        # hand arithmetic of the ratio horizon: floor(r N / B) steps of B tokens at 6 N_matmul + attention FLOPs
        width = 32 * depth
        n_matmul = depth * 12 * width * width + 1024 * width  # blocks (attention 4 w^2 + MLP 8 w^2) + lm_head
        assert params >= n_matmul  # scaling params = matrices (with value-embedding gates) + lm_head
        steps = int(ratio * params) // batch
        attention = depth * 12 * width * 128  # 12 * heads * head_dim * T per layer, full windows
        assert flops == pytest.approx((6 * params + attention) * batch * steps, rel=0.01)
    assert all(by_depth[d][1] < by_depth[d + 1][1] for d in range(1, 8))


def test_dial_picks_the_depth_whose_horizon_costs_nearest_the_budget_and_reads_its_gap_off_the_parabola():
    budget = 1e15
    # bpb = 0.2 (log10 N - 7)^2 + 1.0: minimum 1.0 at N = 1e7
    fit = fit_isoflop(budget, [SweepPoint(budget, n, 6 * n, 0.2 * (math.log10(n) - 7) ** 2 + 1.0)
                               for n in (1e6, 3e6, 1e7, 3e7, 1e8)])
    candidates = {4: (2e6, 2e14), 6: (5e6, 7e14), 8: (2e7, 2.5e15)}  # |ln(7e14/1e15)| = 0.36 < ln 2.5 = 0.92
    choice = dial_choice(fit, 10.5, candidates)
    assert choice.depth == 6 and choice.params == 5e6 and choice.inside
    assert choice.bpb_gap == pytest.approx(0.2 * math.log10(0.5) ** 2, rel=1e-6)
    assert choice.params_vs_opt == pytest.approx(0.5, rel=1e-6)
    assert dial_choice(fit, -1, candidates) is None
    outside = dial_choice(fit, 10.5, {20: (1e9, 1e15)})
    assert not outside.inside and outside.bpb_gap == pytest.approx(0.2 * 4, rel=1e-6)
