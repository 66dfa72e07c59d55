"""The sweep's results as text tables and as sweep.json."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

from titanlite.sweep.fit import SweepFit
from titanlite.sweep.runs import RunRecord, budget_label
from titanlite.sweep.verdict import DialChoice


def _num(value, fmt: str, missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, fmt)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def runs_table(runs: list[RunRecord]) -> str:
    rows = []
    for r in runs:
        off = f"{100 * (r.flops / r.budget - 1):+.1f}%" if r.flops else "-"
        status = r.status + (f" (checkpoint step {r.checkpoint_step})" if r.checkpoint_step is not None else "")
        status += f": {r.error}" if r.error else ""
        rows.append([r.name, budget_label(r.budget), str(r.depth), _num(r.params, ","), _num(r.tokens, ","),
                     _num(r.steps, ""), off, _num(r.tokens_per_param, ".2f"), _num(r.val_bpb, ".4f"),
                     _num(r.train_time_s, ".0f"), status])
    return _table(["run", "budget", "depth", "params N", "tokens D", "steps", "FLOPs vs budget", "D/N",
                   "val_bpb", "train s", "status"], rows)


def fit_table(fit: SweepFit, choices: dict[float, DialChoice]) -> str:
    rows = []
    for f in fit.budgets:
        c = choices.get(f.budget)
        dial = ([f"d{c.depth}", f"{c.params:,}", _num(c.params_vs_opt, ".2f"), _num(c.bpb_gap, "+.4f")
                 + ("" if c.inside else " (extrap.)")] if c else ["-", "-", "-", "-"])
        rows.append([budget_label(f.budget), str(f.runs), _num(f.params_opt, ",.0f"), _num(f.tokens_opt, ",.0f"),
                     _num(f.ratio_opt, ".2f"), _num(f.bpb_opt, ".4f"), *dial, f.note])
    return _table(["budget", "runs", "N_opt", "D_opt", "D/N opt", "bpb_opt", "dial", "dial N", "N/N_opt",
                   "dial bpb gap", "note"], rows)


def laws_lines(fit: SweepFit, ratio: float) -> list[str]:
    if fit.params_law is None:
        return [f"power laws: none ({fit.note})"]
    a, b = fit.params_law, fit.tokens_law
    lines = [f"power laws over {a.budgets} budgets: N_opt = {a.coefficient:.4g} * C^{a.exponent:.3f}, "
             f"D_opt = {b.coefficient:.4g} * C^{b.exponent:.3f} (a + b = {a.exponent + b.exponent:.3f})"]
    ratios = [f.ratio_opt for f in fit.budgets if f.bracketed]
    dial = f"the dial's ratio: {ratio:g}" if ratio > 0 else "the config sets no ratio"
    lines.append(f"compute-optimal tokens:params at the budgets with a minimum inside the sweep: "
                 f"{', '.join(f'{r:.2f}' for r in ratios)}; {dial}")
    return lines


def verdict_lines(fit: SweepFit, choices: dict[float, DialChoice], near_bpb: float) -> list[str]:
    lines = []
    for f in fit.budgets:
        c = choices.get(f.budget)
        if c is None or c.bpb_gap is None:
            continue
        where = "" if c.inside else "; that size is outside the swept sizes (extrapolated)"
        where += "" if f.bracketed else "; the minimum itself lies outside the swept sizes (extrapolated)"
        verdict = (f"near the optimum (gap <= {near_bpb:g})" if c.bpb_gap <= near_bpb
                   else f"off the optimum (gap > {near_bpb:g})")
        lines.append(f"budget {budget_label(f.budget)}: the dial (ratio {c.ratio:g}) trains d{c.depth} "
                     f"({c.params:,} params, {c.params_vs_opt:.2f}x N_opt, its ratio-{c.ratio:g} run costs "
                     f"{c.flops:.3g} FLOPs); fitted val_bpb {c.bpb_fit:.4f} vs optimum {f.bpb_opt:.4f}: "
                     f"{c.bpb_gap:+.4f} bpb, {verdict}{where}")
    return lines


def write_json(path: Path, *, sweep_dir: Path, config_file: str, ratio: float, runs: list[RunRecord],
               fit: SweepFit, choices: dict[float, DialChoice]) -> None:
    def law(p):
        return None if p is None else asdict(p)

    data = {
        "sweep_dir": str(sweep_dir), "config_file": config_file, "dial_ratio": ratio,
        "runs": [r.to_json() for r in runs],
        "fit": {"budgets": [{**asdict(f), "ratio_opt": f.ratio_opt} for f in fit.budgets],
                "params_law": law(fit.params_law), "tokens_law": law(fit.tokens_law), "note": fit.note},
        "dial": [asdict(c) for c in choices.values()],
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
