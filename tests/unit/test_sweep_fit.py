"""The isoFLOP fit on synthetic sweeps whose answers are known in closed form (no training)."""

import math

import numpy as np
import pytest

from titanlite.sweep.fit import SweepPoint, fit_isoflop, fit_sweep, interpolate_flops_per_token

BUDGETS = [1e17, 3e17, 1e18, 3e18, 1e19]


def test_parabolic_isoflops_from_known_power_laws_are_recovered_within_2_percent():
    # N_opt = 0.09 C^0.54; FLOPs/token = 6.5 N^1.04 (not 6N, so b is not simply 1 - a):
    # D_opt = C / (6.5 N_opt^1.04) ∝ C^(1 - 1.04 * 0.54) = C^0.4384
    a, k_n, g, k_f = 0.54, 0.09, 1.04, 6.5
    b = 1 - g * a

    def n_opt(c):
        return k_n * c ** a

    def d_opt(c):
        return c / (k_f * n_opt(c) ** g)

    rng = np.random.default_rng(0)
    grid = [10 ** x for x in np.arange(7.0, 9.51, 0.25)]  # the same "depths" at every budget, as in a sweep
    points = []
    for c in BUDGETS:
        floor = 2.0 * c ** -0.02
        for n in grid:
            bpb = floor + 0.25 * (math.log10(n) - math.log10(n_opt(c))) ** 2 + rng.normal(0, 0.0005)
            points.append(SweepPoint(c, n, k_f * n ** g, bpb))
    fit = fit_sweep(points)

    assert fit.note == "" and len(fit.budgets) == len(BUDGETS)
    assert fit.params_law.exponent == pytest.approx(a, rel=0.02)
    assert fit.tokens_law.exponent == pytest.approx(b, rel=0.02)
    assert fit.params_law.budgets == len(BUDGETS)
    for f in fit.budgets:
        assert f.bracketed and f.runs == len(grid)
        assert f.params_opt == pytest.approx(n_opt(f.budget), rel=0.02)
        assert f.tokens_opt == pytest.approx(d_opt(f.budget), rel=0.02)
        assert f.bpb_opt == pytest.approx(2.0 * f.budget ** -0.02, rel=0.02)
        assert f.ratio_opt == pytest.approx(d_opt(f.budget) / n_opt(f.budget), rel=0.04)


def test_chinchilla_loss_surface_optimum_is_recovered_within_2_percent():
    # L = E + A/N^alpha + B/D^beta with C = 6ND has its isoFLOP minimum at N_opt = G (C/6)^(beta/(alpha+beta)),
    # G = (alpha A / (beta B))^(1/(alpha+beta)) (Hoffmann et al. 2022, eq. 4): a = 0.4516, b = 0.5484.
    E, A, B, alpha, beta = 1.69, 406.4, 410.7, 0.34, 0.28
    G = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
    a, b = beta / (alpha + beta), alpha / (alpha + beta)
    points = []
    for i, c in enumerate(BUDGETS):
        centre = math.log10(G * (c / 6) ** a) + 0.1 * (i - 2)  # depths picked around a guess, off by up to 0.2
        for x in np.linspace(centre - 0.45, centre + 0.45, 7):
            n = 10 ** x
            points.append(SweepPoint(c, n, 6 * n, E + A / n ** alpha + B / (c / (6 * n)) ** beta))
    fit = fit_sweep(points)
    assert fit.params_law.exponent == pytest.approx(a, rel=0.02)
    assert fit.tokens_law.exponent == pytest.approx(b, rel=0.02)
    for f in fit.budgets:
        true_n = G * (f.budget / 6) ** a
        assert f.params_opt == pytest.approx(true_n, rel=0.02)
        assert f.tokens_opt == pytest.approx(f.budget / (6 * true_n), rel=0.02)


def test_a_budget_without_a_usable_minimum_is_reported_not_fitted():
    def pts(c, bpbs):
        return [SweepPoint(c, n, 6 * n, v) for n, v in zip([1e6, 1e7, 1e8], bpbs)]

    falling = fit_isoflop(1e15, pts(1e15, [3.0, 2.5, 2.2]))          # still improving at the largest size
    assert falling.params_opt is None or not falling.bracketed
    assert "largest depth" in falling.note or "U-shaped" in falling.note
    rising = fit_isoflop(1e15, pts(1e15, [2.0, 2.5, 3.2]))            # convex, vertex below the smallest size
    assert rising.params_opt is not None and rising.params_opt < 1e6 and not rising.bracketed
    assert "smaller depths" in rising.note
    two = fit_isoflop(1e15, pts(1e15, [2.0, 1.9, 2.1])[:2])
    assert two.coeffs is None and "needs 3" in two.note
    # one U-shaped budget: no power laws, said so
    fit = fit_sweep(pts(1e15, [2.2, 2.0, 2.1]) + pts(3e15, [2.0, 2.5, 3.2]))
    assert fit.params_law is None and "need 2" in fit.note


def test_flops_per_token_interpolation_is_exact_for_a_power_law_and_straight_outside():
    known = [(n, 7.0 * n ** 1.1) for n in (1e6, 1e7, 1e8)]
    for n in (3e6, 5e7, 1e5, 1e9):  # inside and outside the runs
        assert interpolate_flops_per_token(n, known) == pytest.approx(7.0 * n ** 1.1, rel=1e-9)
    assert interpolate_flops_per_token(2e6, [(1e6, 6e6)]) == pytest.approx(1.2e7)
