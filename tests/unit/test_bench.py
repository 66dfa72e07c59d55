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
        assert 0 < v["mfu"] < 1 and v["peak_flops"] > 1e9
        low, high = v["matmul_check_vs_peak"]
        assert 0 < low <= high
        b = v["breakdown"]
        assert set(b) >= {"data", "forward_backward", "optimizer", "communication"}
        assert all(b[k] >= 0 for k in ("data", "forward_backward", "optimizer"))
        assert b["data"] + b["forward_backward"] + b["optimizer"] <= v["step_time_s"] * 1.001
        assert v["compile_time_s"] >= 0 and v["first_step_s"] > 0 and v["peak_memory_mib"] > 50
        prof = v["profile"]
        assert prof["matmul_s"] > 0 and 0 < prof["non_matmul_share"] < 1 and prof["top_ops"]
    assert report["variants"][1]["overrides"] == ["--model.window_pattern=L"]
    # One MFU denominator for both variants, the trainer's own: the step line's device line shows the same
    # number, and (measured on a quiet machine) it is the one in titanlite's peak cache for 1 thread.
    peaks = {v["peak_flops"] for v in report["variants"]}
    assert len(peaks) == 1
    peak = peaks.pop()
    for v in report["variants"]:
        assert f"{peak:.2e}" in v["device"] and "set by metrics.peak_flops" in v["device"]
    cache = tmp_path / "home" / "cpu_peak_flops.json"
    source = report["variants"][0]["peak_flops_source"]
    if "not cached" in source:  # the other test worker kept the cores busy: used for this run only
        assert not cache.exists()
    else:
        stored = json.loads(cache.read_text())
        assert list(stored.values()) == [peak] and next(iter(stored)).endswith("float32 | 1 threads")


def test_cuda_profile_counts_kernel_time_once_and_gemms_as_matmul():
    """A synthetic CUDA profile: aten rows carry the device time of the kernels they launch, and the kernel
    rows carry it again; only the kernel rows count, GEMM kernels are matmul."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from scripts.bench import split_profile

    def row(key, device_type, device_us, cpu_us=0.0):
        return SimpleNamespace(key=key, device_type=device_type, self_device_time_total=device_us,
                               self_cpu_time_total=cpu_us)

    cpu, cuda = DeviceType.CPU, DeviceType.CUDA
    rows = [
        row("aten::mm", cpu, 700.0, 40.0),                       # launches the two GEMM kernels below
        row("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", cuda, 500.0),
        row("nvjet_hsh_128x256_64x4_1x2_h_bz_coopA_NTT", cuda, 200.0),
        row("aten::_scaled_mm", cpu, 100.0, 10.0),
        row("sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x128x128_cublaslt", cuda, 100.0),
        row("aten::_flash_attention_forward", cpu, 300.0, 20.0),
        row("void flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>, true>", cuda, 300.0),
        row("triton_tem_fused_mm_relu_0", cuda, 50.0),           # inductor's matmul template
        row("triton_poi_fused_add_mul_1", cuda, 80.0),           # inductor's elementwise kernel
        row("ncclDevKernel_AllGather_RING_LL", cuda, 120.0),
        row("nccl:_all_gather_base", cpu, 120.0, 5.0),
        row("Memcpy HtoD (Pageable -> Device)", cuda, 30.0),
        row("aten::add_", cpu, 0.0, 15.0),
    ]
    split, top = split_profile(rows, on_gpu=True)
    seconds = {k: round(v * 1e6, 6) for k, v in split.items()}
    assert seconds == {"matmul": 850.0, "attention": 300.0, "communication": 120.0, "other_ops": 110.0}
    assert sum(seconds.values()) == 1380.0  # the kernel rows once; the aten rows (1220 us) not again
    assert top[0] == (500e-6, "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64")

    # on CPU the ops' own self CPU time is the work and device rows do not exist
    split, _ = split_profile([r for r in rows if r.device_type == cpu], on_gpu=False)
    assert {k: round(v * 1e6, 6) for k, v in split.items()} == {
        "matmul": 50.0, "attention": 20.0, "communication": 5.0, "other_ops": 15.0}
