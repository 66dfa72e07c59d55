import math

import pytest

from titanlite.metrics import format_step_line, peak_flops_for_gpu


@pytest.mark.parametrize("name, flops", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 836e12), ("NVIDIA H800", 756e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA B200", 2.25e15), ("NVIDIA GB200", 2.5e15),
    ("NVIDIA L40S", 362e12), ("NVIDIA L4", 121e12), ("NVIDIA GeForce RTX 4090", 165.2e12),
    ("NVIDIA GeForce RTX 5090", 209.5e12), ("AMD Instinct MI300X", 1.3074e15),
])
def test_peak_flops_table(name, flops):
    assert peak_flops_for_gpu(name) == flops


def test_unknown_gpu_reports_no_mfu_instead_of_guessing():
    assert math.isinf(peak_flops_for_gpu("Some Future Accelerator"))


def test_step_line_fields():
    line = format_step_line(120, 400, 5.8123456, 1.0, 2.9015, 1411.7, 61.234, "epoch: 1 shard: 1 rg: 7", 312.0,
                            726.0)
    assert line == ("step 00120/00400 (30.00%) | loss: 5.812346 | lrm: 1.00 | dt: 2901.50ms | tok/sec: 1,411 | "
                    "mfu: 61.23 | epoch: 1 shard: 1 rg: 7 | total time: 5.20m | eta: 12.1m")
