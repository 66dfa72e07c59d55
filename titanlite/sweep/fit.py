"""IsoFLOP analysis: per budget a parabola of val_bpb in log10(params), across budgets power laws in C.

At one FLOPs budget C, a small model sees many tokens and a large one few; the loss against log(N) is U-shaped
and a parabola through the runs puts the compute-optimal N at its vertex (Chinchilla's "approach 2"). The
optimal token count follows from the budget itself, D_opt = C / flops_per_token(N_opt), with the FLOPs per
token read off the runs (log-log interpolation between them), because a family's FLOPs per token are not 6N.
Across budgets, N_opt = k_N C^a and D_opt = k_D C^b are straight lines in log-log space.

Pure numpy and plain numbers: the training-free tests feed it synthetic sweeps with known answers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SweepPoint:
    budget: float            # the nominal FLOPs budget the run was given (training.target_flops)
    params: float            # the scaling parameter count N
    flops_per_token: float
    val_bpb: float


@dataclass(frozen=True)
class IsoFlopFit:
    budget: float
    runs: int
    coeffs: tuple[float, float, float] | None   # bpb = c2 x^2 + c1 x + c0 with x = log10(N); None: < 3 runs
    log10_params_range: tuple[float, float]
    params_opt: float | None     # vertex of the parabola (None when there is no minimum)
    tokens_opt: float | None     # C / flops_per_token(params_opt)
    bpb_opt: float | None
    bracketed: bool              # the vertex lies inside the swept parameter range
    note: str                    # why a budget has no usable optimum ("" when it has one)

    def bpb_at(self, params: float) -> float | None:
        if self.coeffs is None:
            return None
        return float(np.polyval(self.coeffs, math.log10(params)))

    @property
    def ratio_opt(self) -> float | None:
        if self.params_opt is None or self.tokens_opt is None:
            return None
        return self.tokens_opt / self.params_opt


@dataclass(frozen=True)
class PowerLaw:
    exponent: float
    coefficient: float           # y = coefficient * C^exponent
    budgets: int                 # how many budgets the line is fitted through

    def __call__(self, budget: float) -> float:
        return self.coefficient * budget ** self.exponent


@dataclass(frozen=True)
class SweepFit:
    budgets: tuple[IsoFlopFit, ...]
    params_law: PowerLaw | None  # N_opt ∝ C^a
    tokens_law: PowerLaw | None  # D_opt ∝ C^b
    note: str                    # why there are no power laws ("" when there are)


def interpolate_flops_per_token(params: float, known: list[tuple[float, float]]) -> float:
    """FLOPs per token at `params`, piecewise linear in log-log through the runs' (N, FLOPs/token); straight
    continuation of the end segments outside them."""
    pts = sorted(set(known))
    if len(pts) == 1:
        n, f = pts[0]
        return f * params / n  # one run: FLOPs per token proportional to N (the 6N rule's shape)
    xs = [math.log(n) for n, _ in pts]
    ys = [math.log(f) for _, f in pts]
    x = math.log(params)
    i = 0 if x <= xs[0] else len(xs) - 2 if x >= xs[-1] else int(np.searchsorted(xs, x)) - 1
    slope = (ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i])
    return math.exp(ys[i] + slope * (x - xs[i]))


def fit_isoflop(budget: float, points: list[SweepPoint]) -> IsoFlopFit:
    pts = sorted(points, key=lambda p: p.params)
    xs = np.array([math.log10(p.params) for p in pts])
    span = (float(xs.min()), float(xs.max())) if len(pts) else (math.nan, math.nan)

    def without(note: str, coeffs=None) -> IsoFlopFit:
        return IsoFlopFit(budget, len(pts), coeffs, span, None, None, None, False, note)

    if len({p.params for p in pts}) < 3:
        return without(f"{len(pts)} finished run(s) of distinct size; a parabola needs 3")
    ys = np.array([p.val_bpb for p in pts])
    c2, c1, c0 = (float(c) for c in np.polyfit(xs, ys, 2))
    coeffs = (c2, c1, c0)
    if c2 <= 0:
        return without("val_bpb is not U-shaped in log(params) (no minimum): widen the depths", coeffs)
    x_opt = -c1 / (2 * c2)
    params_opt = 10.0 ** x_opt
    tokens_opt = budget / interpolate_flops_per_token(params_opt, [(p.params, p.flops_per_token) for p in pts])
    bracketed = span[0] <= x_opt <= span[1]
    note = "" if bracketed else ("minimum below the smallest depth: add smaller depths" if x_opt < span[0]
                                 else "minimum above the largest depth: add larger depths")
    return IsoFlopFit(budget, len(pts), coeffs, span, params_opt, tokens_opt,
                      float(np.polyval(coeffs, x_opt)), bracketed, note)


def fit_power_law(budgets: list[float], values: list[float]) -> PowerLaw:
    """Least squares of log10(y) = log10(k) + e log10(C)."""
    slope, intercept = np.polyfit(np.log10(budgets), np.log10(values), 1)
    return PowerLaw(float(slope), float(10.0 ** intercept), len(budgets))


def fit_sweep(points: list[SweepPoint]) -> SweepFit:
    """Per budget the isoFLOP parabola; power laws through the budgets whose minimum lies inside the swept
    range (an extrapolated vertex is reported but not trusted for the exponents)."""
    by_budget: dict[float, list[SweepPoint]] = {}
    for p in points:
        if p.val_bpb is not None and math.isfinite(p.val_bpb):
            by_budget.setdefault(p.budget, []).append(p)
    fits = tuple(fit_isoflop(budget, by_budget[budget]) for budget in sorted(by_budget))
    usable = [f for f in fits if f.bracketed]
    if len(usable) < 2:
        return SweepFit(fits, None, None, f"{len(usable)} budget(s) with a minimum inside the swept depths; the "
                                          "power laws need 2")
    cs = [f.budget for f in usable]
    return SweepFit(fits, fit_power_law(cs, [f.params_opt for f in usable]),
                    fit_power_law(cs, [f.tokens_opt for f in usable]), "")
