"""The CPU peak MFU divides by: measured once per (CPU, dtype, threads), cached, overridable."""

import json

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
    best = cpu_peak.measure_matmul_peak(torch.float32, size=n, trials=5)
    assert best > 0.3 * one_trial  # best of 5 is never far below any single trial (noise allowance)
