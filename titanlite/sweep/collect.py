"""Collecting a sweep: whatever run folders exist → the isoFLOP fit, the dial's verdict, the tables,
sweep.json and sweep.png."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from titanlite.errors import UserError
from titanlite.sweep.fit import SweepFit, SweepPoint, fit_sweep
from titanlite.sweep.plot import plot_sweep
from titanlite.sweep.report import fit_table, laws_lines, runs_table, verdict_lines, write_json
from titanlite.sweep.runs import FAILED, FINISHED, RunRecord, discover_runs
from titanlite.sweep.verdict import DialChoice, dial_choice, dial_flops_by_depth

JSON_FILE = "sweep.json"
PLOT_FILE = "sweep.png"


def fit_runs(runs: list[RunRecord]) -> SweepFit:
    return fit_sweep([SweepPoint(r.budget, r.params, r.flops_per_token, r.val_bpb)
                      for r in runs if r.status == FINISHED])


def dial_choices(config, runs: list[RunRecord], fit: SweepFit) -> dict[float, DialChoice]:
    ratio = config.training.target_param_data_ratio
    if ratio <= 0:
        return {}
    finished = [r for r in runs if r.status == FINISHED]
    # the tokenizer's vocab and the world size the runs had: the dial's plans must match the runs' own
    vocab = next((r.vocab_size for r in finished if r.vocab_size), config.data.vocab_size)
    world = next((r.world_size for r in finished if r.world_size), 1)
    candidates = dial_flops_by_depth(config, vocab, world, ratio)
    choices = {}
    for f in fit.budgets:
        choice = dial_choice(f, ratio, candidates)
        if choice is not None:
            choices[f.budget] = choice
    return choices


def collect(sweep_dir: Path, config, config_file: str, say: Callable[[str], None], near_bpb: float) -> dict:
    runs = discover_runs(sweep_dir)
    if not runs:
        raise UserError(f"no run folders (C<budget>-d<depth>) in {sweep_dir}; run the sweep first or pass the "
                        f"sweep folder with --out")
    fit = fit_runs(runs)
    choices = dial_choices(config, runs, fit)
    ratio = config.training.target_param_data_ratio
    say(f"\nRuns in {sweep_dir}:")
    say(runs_table(runs))
    say("\nIsoFLOP fit per budget (N = scaling params, D = tokens; dial = the depth that "
        f"target_param_data_ratio = {ratio:g} trains for that budget):" if ratio > 0 else
        "\nIsoFLOP fit per budget (N = scaling params, D = tokens; the config sets no target_param_data_ratio):")
    say(fit_table(fit, choices))
    for line in laws_lines(fit, ratio) + verdict_lines(fit, choices, near_bpb):
        say(line)
    failed = sum(r.status == FAILED for r in runs)
    if failed:
        say(f"{failed} run(s) failed: their error is in the table and in <run>/sweep_failure.json")
    write_json(sweep_dir / JSON_FILE, sweep_dir=sweep_dir, config_file=config_file, ratio=ratio, runs=runs,
               fit=fit, choices=choices)
    try:
        plot_sweep(sweep_dir / PLOT_FILE, runs, fit, choices)
    except ModuleNotFoundError as exc:
        if exc.name != "matplotlib":
            raise
        say(f"wrote {sweep_dir / JSON_FILE}; no {PLOT_FILE}: drawing it needs matplotlib "
            f"(pip install -e \".[plot]\"), then run again with --collect")
    else:
        say(f"wrote {sweep_dir / JSON_FILE} and {sweep_dir / PLOT_FILE}")
    return {"runs": runs, "fit": fit, "choices": choices}
