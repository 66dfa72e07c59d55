"""The runs of a sweep: one run folder per (FLOPs budget, depth) under the sweep folder, and what each says.

A run folder is the trainer's own (`job.dump_folder` = the sweep folder, `checkpoint.model_tag` = the run's
name), so a sweep run is an ordinary titanlite run: it resumes, it can be inspected and plotted like any other.
Its state is read from what the trainer wrote, never from the sweep's memory: `summary.json` whose step count
reached the plan's means finished; a failure is the sweep's own `sweep_failure.json`; a folder with neither
was interrupted (and resumes from its latest checkpoint if it has one).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from titanlite.checkpoint import list_steps
from titanlite.errors import UserError
from titanlite.paths import read_json_object

SUMMARY_FILE = "summary.json"
FAILURE_FILE = "sweep_failure.json"   # written by the sweep when a run fails; removed when it is retried
LOG_FILE = "train.log"                # the run's terminal output, appended per attempt
RUN_NAME = re.compile(r"^C(?P<budget>\d+(?:\.\d+)?e\d+)-d(?P<depth>\d+)$")

FINISHED, FAILED, INTERRUPTED, PENDING = "finished", "failed", "interrupted", "pending"


def budget_label(budget: float) -> str:
    """1e15 -> '1e15', 3e15 -> '3e15', 2.15e18 -> '2.15e18' (the short form used in run names)."""
    mantissa, exponent = f"{budget:.6e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def run_name(budget: float, depth: int) -> str:
    return f"C{budget_label(budget)}-d{depth}"


def parse_budgets(text: str) -> list[float]:
    try:
        budgets = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--flops {text!r} is not a comma-separated list of numbers; e.g. --flops 1e15,3e15,1e16") \
            from None
    if not budgets or any(not math.isfinite(b) or b <= 0 for b in budgets):
        raise UserError(f"--flops {text!r} must list positive FLOPs budgets, e.g. --flops 1e15,3e15,1e16")
    return sorted(set(float(budget_label(b)) for b in budgets))


def parse_depths(text: str) -> list[int]:
    try:
        depths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--depths {text!r} is not a comma-separated list of integers; e.g. --depths 4,6,8,10") \
            from None
    if not depths or any(d < 1 for d in depths):
        raise UserError(f"--depths {text!r} must list positive depths, e.g. --depths 4,6,8,10")
    return sorted(set(depths))


@dataclass
class RunRecord:
    name: str
    budget: float
    depth: int
    status: str                          # finished | failed | interrupted | pending
    params: int | None = None            # scaling parameters (the N of tokens:params)
    params_total: int | None = None
    flops_per_token: float | None = None
    tokens: int | None = None
    steps: int | None = None
    flops: float | None = None           # what the run actually spent (whole steps: within a step of the budget)
    val_bpb: float | None = None         # at the last step
    train_time_s: float | None = None
    world_size: int | None = None
    vocab_size: int | None = None
    checkpoint_step: int | None = None   # latest complete checkpoint of an interrupted run
    error: str = ""

    @property
    def tokens_per_param(self) -> float | None:
        return self.tokens / self.params if self.tokens and self.params else None

    def to_json(self) -> dict:
        return {**asdict(self), "tokens_per_param": self.tokens_per_param}


def read_run(folder: Path, budget: float, depth: int) -> RunRecord:
    record = RunRecord(run_name(budget, depth), budget, depth, PENDING)
    summary = read_json_object(folder / SUMMARY_FILE)
    if summary is not None:
        plan, config = summary.get("plan", {}), summary.get("config", {})
        ran = (config.get("model", {}).get("depth"), config.get("training", {}).get("target_flops"))
        if ran != (depth, budget):
            record.status, record.error = FAILED, (f"{folder / SUMMARY_FILE} is from depth {ran[0]} at budget "
                                                   f"{ran[1]}, not this run; move that folder away")
            return record
        if summary.get("steps") == plan.get("num_iterations") and summary.get("final_val_bpb") is not None:
            record.status = FINISHED
            record.params, record.params_total = plan.get("scaling_params"), plan.get("params", {}).get("total")
            record.flops_per_token, record.tokens = plan.get("flops_per_token"), summary.get("tokens")
            record.steps, record.flops = summary.get("steps"), summary.get("total_flops")
            record.val_bpb, record.train_time_s = summary.get("final_val_bpb"), summary.get("total_training_time_s")
            record.world_size, record.vocab_size = plan.get("world_size"), plan.get("vocab_size")
            return record
    failure = read_json_object(folder / FAILURE_FILE)
    if failure is not None:
        record.status, record.error = FAILED, str(failure.get("error", "failed (no message recorded)"))
        return record
    if folder.is_dir() and any(folder.iterdir()):
        record.status = INTERRUPTED
        steps = list_steps(folder)
        record.checkpoint_step = steps[-1] if steps else None
    return record


def discover_runs(sweep_dir: Path) -> list[RunRecord]:
    """Every run folder under the sweep folder (named C<budget>-d<depth>), by budget then depth."""
    if not sweep_dir.is_dir():
        return []
    found = []
    for entry in sweep_dir.iterdir():
        match = RUN_NAME.match(entry.name)
        if match and entry.is_dir():
            found.append(read_run(entry, float(match["budget"]), int(match["depth"])))
    return sorted(found, key=lambda r: (r.budget, r.depth))
