"""The CPU peak MFU divides by: measured once per (CPU, dtype, threads), cached, overridable, never cached when
other processes held the cores while it was measured."""

import json
import subprocess
import sys

from pathlib import Path

import torch

from titanlite import cpu_peak
from titanlite.metrics import describe_device


def _counting_measure(monkeypatch, value):
    calls = []

    def fake_measure(dtype, *args, **kwargs):
        calls.append(dtype)
        return value

    monkeypatch.setattr(cpu_peak, "measure_matmul_peak", fake_measure)
    return calls


def test_second_start_reads_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TITANLITE_HOME", str(tmp_path))
    calls = _counting_measure(monkeypatch, 1.25e11)
    first = describe_device(torch.device("cpu"), torch.float32)
    assert calls == [torch.float32] and "measured now" in first.line
    calls[:] = []
    _counting_measure(monkeypatch, 9.0e11)  # a second measurement would return another number
    second = describe_device(torch.device("cpu"), torch.float32)
    assert second.peak_flops == 1.25e11 and "cached in" in second.line
    stored = json.loads((tmp_path / cpu_peak.CACHE_FILE).read_text())
    assert list(stored.values()) == [1.25e11]
    assert f"{torch.get_num_threads()} threads" in next(iter(stored))


def test_cache_is_per_dtype_and_thread_count(tmp_path, monkeypatch):
    monkeypatch.setenv("TITANLITE_HOME", str(tmp_path))
    calls = _counting_measure(monkeypatch, 2e11)
    describe_device(torch.device("cpu"), torch.float32)
    describe_device(torch.device("cpu"), torch.bfloat16)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        describe_device(torch.device("cpu"), torch.float32)
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 3
    assert len(json.loads((tmp_path / cpu_peak.CACHE_FILE).read_text())) == 3


def test_override_and_remeasure(tmp_path, monkeypatch):
    monkeypatch.setenv("TITANLITE_HOME", str(tmp_path))
    calls = _counting_measure(monkeypatch, 3e11)
    describe_device(torch.device("cpu"), torch.float32)
    forced = describe_device(torch.device("cpu"), torch.float32, peak_override=5e10)
    assert forced.peak_flops == 5e10 and "set by metrics.peak_flops" in forced.line and len(calls) == 1
    _counting_measure(monkeypatch, 4e11)
    again = describe_device(torch.device("cpu"), torch.float32, remeasure_peak=True)
    assert again.peak_flops == 4e11
    assert describe_device(torch.device("cpu"), torch.float32).peak_flops == 4e11  # the new value was cached


def test_damaged_cache_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setenv("TITANLITE_HOME", str(tmp_path))
    (tmp_path / cpu_peak.CACHE_FILE).write_text("{not json")
    _counting_measure(monkeypatch, 7e10)
    assert describe_device(torch.device("cpu"), torch.float32).peak_flops == 7e10


def test_measured_peak_is_the_best_trial_of_a_real_matmul():
    # A literal FLOP count: 2*n^3 for an n x n matmul, timed here independently of the module.
    import time

    n = 256
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    t0 = time.perf_counter()
    torch.mm(a, b)
    one_trial = 2 * n**3 / (time.perf_counter() - t0)
    best = cpu_peak.measure_matmul_peak(torch.float32, size=n, min_trials=5, min_seconds=0.0)
    assert best > 0.3 * one_trial  # best of 5 is never far below any single trial (noise allowance)


def _fake_measurement(monkeypatch, flops, busy_elsewhere):
    calls = []

    def fake(dtype):
        calls.append(dtype)
        return cpu_peak.Measurement(flops, busy_elsewhere)

    monkeypatch.setattr(cpu_peak, "measure_peak_and_load", fake)
    return calls


def test_a_measurement_under_load_is_used_but_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("TITANLITE_HOME", str(tmp_path))
    calls = _fake_measurement(monkeypatch, 4e10, busy_elsewhere=0.6)
    loaded = describe_device(torch.device("cpu"), torch.float32)
    assert loaded.peak_flops == 4e10 and "not cached" in loaded.line and "60%" in loaded.line
    assert not (tmp_path / cpu_peak.CACHE_FILE).exists()
    calls = _fake_measurement(monkeypatch, 1.5e11, busy_elsewhere=0.02)  # the next start: a quiet machine
    quiet = describe_device(torch.device("cpu"), torch.float32)
    assert calls == [torch.float32] and quiet.peak_flops == 1.5e11 and "saved to" in quiet.line
    assert describe_device(torch.device("cpu"), torch.float32).peak_flops == 1.5e11


def test_cache_key_names_the_instruction_set(tmp_path, monkeypatch):
    # CPUs of one model name differ in AVX-512 / bf16 support, and their matmul peaks differ 2-3x with it
    flags = (Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else "")
    key = cpu_peak.cache_key(torch.float32, 2)
    expected = next((f for f in cpu_peak.ISA_FLAGS if f" {f}" in flags), None)
    if expected:
        assert f"[{expected}]" in key
    assert key.endswith("float32 | 2 threads")


def test_real_load_from_other_processes_is_detected(tmp_path):
    # Two busy-looping processes (one per core of these machines) take the cores from the measurement: the
    # reading from /proc/stat must see them, and the low number it gives must not reach the cache.
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        import time

        time.sleep(0.3)
        m = cpu_peak.measure_peak_and_load(torch.float32)
        peak = cpu_peak.cpu_peak_flops(torch.float32, cache=tmp_path / "peak.json")
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    assert m.busy_elsewhere is not None and m.busy_elsewhere > cpu_peak.BUSY_ELSEWHERE_LIMIT
    assert not m.clean
    assert "not cached" in peak.source and not (tmp_path / "peak.json").exists()


def test_emulated_dtypes_are_measured_on_smaller_matmuls(monkeypatch):
    monkeypatch.setattr(cpu_peak, "SLOW_MATMUL_SECONDS", 0.0)  # every size counts as slow: stop at the first
    assert cpu_peak.pick_matmul_size(torch.float32) == cpu_peak.SMALLEST_SIZE
    monkeypatch.setattr(cpu_peak, "SLOW_MATMUL_SECONDS", float("inf"))
    assert cpu_peak.pick_matmul_size(torch.float32) == cpu_peak.MATMUL_SIZE
