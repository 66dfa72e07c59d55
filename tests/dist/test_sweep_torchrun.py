"""The sweep's torchrun launcher for real: each run is 2 gloo processes started by torchrun."""

import json
import subprocess
import sys

from tests.helpers.runs import prepared_home
from tests.unit.test_scaling_sweep import REPO, TOY, _env

import pytest


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    yield from prepared_home(tmp_path_factory, TOY)


def test_torchrun_launcher_runs_each_run_on_two_processes(home, tmp_path):
    out = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "scripts.scaling_sweep", *TOY, "--training.device_batch_size=2",
                           "--depths", "1", "--flops", "1e9", "--out", str(out), "--launch", "torchrun",
                           "--nproc-per-node", "2"], cwd=REPO, env=_env(home), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "C1e9-d1" / "summary.json").read_text())
    assert summary["plan"]["world_size"] == 2 and summary["steps"] == summary["plan"]["num_iterations"] > 0
    data = json.loads((out / "sweep.json").read_text())
    assert [(r["name"], r["status"], r["world_size"]) for r in data["runs"]] == [("C1e9-d1", "finished", 2)]
