"""scripts/bench.py in its CI smoke mode: two variants side by side, every field of the JSON report present."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_smoke_json_has_every_field(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, TITANLITE_HOME=str(tmp_path / "home"), TORCHAO_FORCE_SKIP_LOADING_SO_FILES="1")
    proc = subprocess.run([sys.executable, "-m", "scripts.bench", "--smoke", "--threads", "1", "--json", str(out),
                           "--variant", "full window: --model.window_pattern=L"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tok/s" in proc.stdout and "full window" in proc.stdout  # the table
    report = json.loads(out.read_text())
    assert report["steps_per_round"] == 2 and report["warmup"] == 1
    assert set(report["machine"]) >= {"cpu", "cores", "torch", "native_bf16", "load_start", "load_end"}
    names = [v["name"] for v in report["variants"]]
    assert names == ["baseline", "full window"]
    for v in report["variants"]:
        for key in ("tokens_per_sec", "mfu", "step_time_s", "peak_flops", "peak_flops_source", "breakdown",
                    "peak_memory_mib", "compile_time_s", "first_step_s", "compute_dtype", "attention_backend",
                    "processes", "threads_per_process", "flops_per_token", "tokens_per_step", "profile"):
            assert key in v, key
        assert v["steps_timed"] == 2 and len(v["step_times_s"]) == 2
        assert v["tokens_per_step"] == 256 and v["tokens_per_sec"] > 0
        assert 0 < v["mfu"] < 1 and v["peak_flops"] > 1e9  # against the fp32 matmul peak measured in this run
        b = v["breakdown"]
        assert set(b) >= {"data", "forward_backward", "optimizer", "communication"}
        assert all(b[k] >= 0 for k in ("data", "forward_backward", "optimizer"))
        assert b["data"] + b["forward_backward"] + b["optimizer"] <= v["step_time_s"] * 1.001
        assert v["compile_time_s"] >= 0 and v["first_step_s"] > 0 and v["peak_memory_mib"] > 50
        prof = v["profile"]
        assert prof["matmul_s"] > 0 and 0 < prof["non_matmul_share"] < 1 and prof["top_ops"]
    assert report["variants"][1]["overrides"] == ["--model.window_pattern=L"]
    # one MFU denominator for all variants: the best machine peak any of them measured
    assert len({v["peak_flops"] for v in report["variants"]}) == 1
    best = max(sum(max(m["fp32"] for m in rank) for rank in v["peaks_measured"]) for v in report["variants"])
    assert report["variants"][0]["peak_flops"] == best
