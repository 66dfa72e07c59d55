"""scripts/gpu_check.py --smoke: the GPU acceptance script's code path on a tiny model, on whatever machine runs CI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_smoke_runs_reports_and_explains_skips(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, TITANLITE_HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "scripts.gpu_check", "--smoke", "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["passed"] and report["smoke"]
    assert report["environment"]["torch"] == torch.__version__
    rows = report["attention"]
    assert {(r["backend"], r["window"][0]) for r in rows} == {
        (b, w) for b in ("fa3", "fa4", "flash_attn", "flex", "sdpa") for w in "SL"}
    sdpa = [r for r in rows if r["backend"] == "sdpa"]
    assert all(r["status"] == "ok" and r["forward_error"] == 0.0 for r in sdpa)  # the reference against itself
    for row in rows:  # every backend either ran and agreed, or says why it could not run
        assert row["status"] == "ok" or (row["status"] == "skipped" and row["reason"])
    modes = {r["mode"]: r for r in report["training"]}
    assert list(modes) == ["eager", "compile", "compile + float8 tensorwise", "compile + float8 rowwise"]
    eager = modes["eager"]
    assert eager["status"] == "ok" and eager["tok_per_s"] > 0 and 0 < eager["mfu"] < 1
    assert len(eager["losses"]) == 3 and all(5.0 < x < 8.0 for x in eager["losses"])  # ~ln(512) at init
    for row in modes.values():
        assert row["status"] == "ok" or row["reason"]
    assert report["fsdp"]["status"] == "ok" or report["fsdp"]["reason"]
    # one table on stdout: a line per check, skipped ones with their reason
    table = proc.stdout
    assert "attention sdpa S" in table and "d2 eager" in table and "FSDP step on 2 GPUs" in table
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in table and "needs 2 GPUs (0 visible)" in table
