"""The verdict on the depth dial: for a FLOPs budget, which depth the dial's tokens:params ratio would train,
and how far the fitted isoFLOP curve puts that depth above the fitted optimum.

With `training.target_param_data_ratio = r` the horizon of depth d costs C(d) = FLOPs/token(d) x tokens(r, d)
(the planner's own arithmetic, whole steps included). A user with a budget C who follows the dial trains the
depth whose C(d) is nearest C in log space; the sweep's parabola at that budget says what that model would
reach, against the best the budget allows.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from titanlite.errors import UserError
from titanlite.scaling import derive_plan
from titanlite.sweep.fit import IsoFlopFit

MAX_DEPTH = 128


@dataclass(frozen=True)
class DialChoice:
    budget: float
    ratio: float
    depth: int
    params: int              # scaling parameters of that depth
    flops: float             # what the dial's run at that depth costs (not exactly the budget)
    bpb_fit: float | None    # the budget's parabola at that size
    bpb_gap: float | None    # bpb_fit - the parabola's minimum
    params_vs_opt: float | None   # params / N_opt
    inside: bool             # that size lies inside the swept range (else the parabola is extrapolated)


def dial_flops_by_depth(config, vocab_size: int, world_size: int, ratio: float) -> dict[int, tuple[int, float]]:
    """{depth: (scaling params, FLOPs of the ratio-r horizon)} for every depth the planner accepts."""
    training = dataclasses.replace(config.training, num_iterations=-1, target_flops=-1.0,
                                   target_param_data_ratio=ratio)
    out = {}
    for depth in range(1, MAX_DEPTH + 1):
        try:
            plan = derive_plan(dataclasses.replace(config.model, depth=depth), training, config.optimizer,
                               vocab_size, world_size)
        except UserError:
            continue  # e.g. a horizon under one step, or a batch the micro-batch does not divide
        out[depth] = (plan.scaling_params, plan.total_flops)
    return out


def dial_choice(fit: IsoFlopFit, ratio: float, candidates: dict[int, tuple[int, float]]) -> DialChoice | None:
    if ratio <= 0 or not candidates:
        return None
    depth = min(candidates, key=lambda d: abs(math.log(candidates[d][1] / fit.budget)))
    params, flops = candidates[depth]
    bpb = fit.bpb_at(params)
    gap = bpb - fit.bpb_opt if bpb is not None and fit.bpb_opt is not None else None
    low, high = fit.log10_params_range
    return DialChoice(fit.budget, ratio, depth, params, flops, bpb, gap,
                      params / fit.params_opt if fit.params_opt else None,
                      low <= math.log10(params) <= high)
