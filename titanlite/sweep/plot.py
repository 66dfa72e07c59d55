"""sweep.png: left, the isoFLOP curves (val_bpb against params per budget, the fitted parabolas, their minima
and the dial's pick); right, N_opt and D_opt against the budget with the fitted power laws."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from titanlite.sweep.fit import SweepFit
from titanlite.sweep.runs import FINISHED, RunRecord, budget_label
from titanlite.sweep.verdict import DialChoice


def plot_sweep(path: Path, runs: list[RunRecord], fit: SweepFit, choices: dict[float, DialChoice]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (iso, laws) = plt.subplots(1, 2, figsize=(13, 5))
    budgets = sorted({r.budget for r in runs})
    colors = {b: plt.cm.viridis(i / max(1, len(budgets) - 1)) for i, b in enumerate(budgets)}
    fits = {f.budget: f for f in fit.budgets}
    for budget in budgets:
        done = sorted((r for r in runs if r.budget == budget and r.status == FINISHED), key=lambda r: r.params)
        color = colors[budget]
        if done:
            iso.plot([r.params for r in done], [r.val_bpb for r in done], "o", color=color,
                     label=f"C = {budget_label(budget)}")
            for r in done:
                iso.annotate(f"d{r.depth}", (r.params, r.val_bpb), textcoords="offset points", xytext=(4, 4),
                             fontsize=7, color=color)
        f = fits.get(budget)
        if f is not None and f.coeffs is not None:
            low, high = f.log10_params_range
            if f.params_opt is not None:  # draw the curve out to an extrapolated minimum (at most a decade away)
                vertex = math.log10(f.params_opt)
                low, high = min(low, max(vertex, low - 1)), max(high, min(vertex, high + 1))
            xs = np.linspace(low - 0.1, high + 0.1, 100)
            iso.plot(10 ** xs, np.polyval(f.coeffs, xs), "-", color=color, alpha=0.7)
            if f.params_opt is not None:  # hollow: the minimum lies outside the swept sizes
                iso.plot([f.params_opt], [f.bpb_opt], "*", color=color if f.bracketed else "none", markersize=15,
                         markeredgecolor="black", zorder=5)
        choice = choices.get(budget)
        if choice is not None and choice.bpb_fit is not None:
            iso.plot([choice.params], [choice.bpb_fit], "x", color=color, markersize=10, mew=2, zorder=5)
    iso.set_xscale("log")
    iso.set_xlabel("scaling parameters N")
    iso.set_ylabel("final val_bpb")
    iso.set_title("isoFLOP curves (star: fitted minimum, hollow if outside the sweep; x: the dial's depth)",
                  fontsize=10)
    iso.grid(alpha=0.3, which="both")
    if budgets:
        iso.legend(fontsize=8)

    optimal = [f for f in fit.budgets if f.params_opt is not None and f.bracketed]
    if optimal:
        cs = [f.budget for f in optimal]
        laws.plot(cs, [f.params_opt for f in optimal], "o", color="tab:blue", label="N_opt")
        laws.plot(cs, [f.tokens_opt for f in optimal], "s", color="tab:orange", label="D_opt")
        if fit.params_law is not None:
            line = np.logspace(math.log10(min(cs)) - 0.2, math.log10(max(cs)) + 0.2, 50)
            laws.plot(line, fit.params_law(line), "-", color="tab:blue",
                      label=f"N_opt ∝ C^{fit.params_law.exponent:.3f}")
            laws.plot(line, fit.tokens_law(line), "-", color="tab:orange",
                      label=f"D_opt ∝ C^{fit.tokens_law.exponent:.3f}")
        laws.set_xscale("log")
        laws.set_yscale("log")
        laws.legend(fontsize=8)
    else:
        laws.text(0.5, 0.5, fit.note or "no budget with a minimum inside the swept depths",
                  ha="center", va="center", transform=laws.transAxes, fontsize=9)
    laws.set_xlabel("FLOPs budget C")
    laws.set_ylabel("compute-optimal N and D")
    laws.set_title("compute-optimal size and data")
    laws.grid(alpha=0.3, which="both")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
