"""scripts/profile_step.py: each op's self time lands in the bucket of the work it belongs to."""

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from scripts.bench import SMOKE_OVERRIDES
from scripts.profile_step import attribute, bucket_of

REPO = Path(__file__).resolve().parents[2]


def _event(name, parent=None, self_us=0.0):
    return SimpleNamespace(name=name, cpu_parent=parent, self_cpu_time_total=self_us)


def test_ops_are_bucketed_by_their_ancestors():
    head = _event("titanlite::head")
    opt = _event("titanlite::optimizer")
    mm_backward = _event("autograd::engine::evaluate_function: MmBackward0")
    norm_backward = _event("autograd::engine::evaluate_function: _RmsNormBackward")
    to = _event("aten::to")
    events = [
        _event("aten::mm", head, 5000), _event("aten::exp_", head, 1000),       # the head's matmul and softmax
        _event("aten::mm", mm_backward, 3000), _event("aten::mm", None, 2000),  # the blocks' matmuls
        _event("aten::copy_", _event("aten::_to_copy", to), 700),               # a dtype cast
        _event("aten::mul", norm_backward, 400),                               # RMSNorm's backward
        _event("aten::bmm", opt, 900),                                          # Muon's Newton-Schulz
        _event("aten::_scaled_dot_product_flash_attention_for_cpu", None, 800),
        _event("aten::add", _event("autograd::engine::evaluate_function: AddBackward0"), 100),
    ]
    assert [bucket_of(e) for e in events] == ["head", "head", "matmul", "matmul", "casts", "norm", "optimizer",
                                              "attention", "bwd AddBackward"]
    buckets, ops, pairs = attribute(events + [_event("titanlite::head", None, 50)])  # labels carry no work
    assert buckets == {"head": 6000 / 1e6, "matmul": 5000 / 1e6, "casts": 700 / 1e6, "norm": 400 / 1e6,
                       "optimizer": 900 / 1e6, "attention": 800 / 1e6, "bwd AddBackward": 100 / 1e6}
    assert ops["aten::mm"] == 10000 / 1e6 and pairs["head", "aten::mm"] == 5000 / 1e6


def test_profile_of_a_real_step(tmp_path):
    env = dict(os.environ, TITANLITE_HOME=str(tmp_path / "home"), TORCHAO_FORCE_SKIP_LOADING_SO_FILES="1")
    proc = subprocess.run([sys.executable, "-m", "scripts.profile_step", "--warmup", "1", "--steps", "1",
                           "--threads", "1", *SMOKE_OVERRIDES, f"--job.dump_folder={tmp_path / 'runs'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = dict(re.findall(r"^(\S[^\n]*?)\s+([\d.]+)\s+[\d.]+%$", proc.stdout, re.M))
    wall = float(re.search(r"([\d.]+) ms/step wall", proc.stdout).group(1))
    for bucket in ("head", "matmul", "attention", "optimizer", "norm", "rope", "relu^2"):
        assert float(rows[bucket]) > 0, bucket
    bucket_block = proc.stdout.split("top ")[0]
    shares = [float(s) for s in re.findall(r"([\d.]+)%$", bucket_block, re.M)]
    assert 99.0 <= sum(shares) <= 101.0  # buckets and untracked time make up the step, each second once
    assert 0 < sum(float(rows[b]) for b in ("head", "matmul", "attention", "optimizer")) < wall
