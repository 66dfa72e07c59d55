"""The README's main job, shortened: the shipped CPU debug config through the real command line, from an empty
cache (corpus + tokenizer built from scratch), printing decreasing val_bpb and the seven samples."""

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_debug_cpu_main_job_from_scratch(tmp_path):
    env = dict(os.environ, TITANLITE_HOME=str(tmp_path / "home"))
    cmd = [sys.executable, "-m", "titanlite.train", "--job.config_file", "train_configs/debug_cpu.toml",
           "--training.num_iterations=12", "--eval.eval_every=6", "--eval.sample_every=12", "--eval.eval_tokens=8192",
           # shortened further: the tokenizer learns from the first 2M characters, the MFU divides by a set peak
           "--data.tokenizer_max_chars=2000000", "--metrics.peak_flops=1e11",
           f"--job.dump_folder={tmp_path / 'outputs'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "data: wrote" in out and "tokenizer: saved" in out  # built from an empty cache
    bpbs = [float(x) for x in re.findall(r"\| validation bpb: ([0-9.]+)", out)]
    assert len(bpbs) == 3 and bpbs[0] > bpbs[1] > bpbs[2]
    assert len(re.findall(r"^  sample: ", out, flags=re.M)) == 7
    assert "step 00012/00012 (100.00%)" in out
    assert (tmp_path / "outputs" / "d4" / "step-000012").is_dir()
