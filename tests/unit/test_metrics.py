import math

import pytest

from titanlite.metrics import format_step_line, peak_flops_for_gpu

# Dense (no structured sparsity) BF16 tensor-core peaks from the vendors' datasheets, in FLOP/s. NVIDIA's
# datasheets print the sparse figure with an asterisk; dense is half of it. Keyed by the strings
# torch.cuda.get_device_name returns on those boards.
DATASHEET_DENSE_BF16 = [
    # H100 SXM5: 1,979 TFLOPS with sparsity -> 989.5 dense ("NVIDIA H100 80GB HBM3" is the SXM board)
    ("NVIDIA H100 80GB HBM3", 989.5e12),
    # H100 PCIe: 1,513 TFLOPS with sparsity -> 756.5 dense
    ("NVIDIA H100 PCIe", 756.5e12),
    # H100 NVL: 1,671 TFLOPS with sparsity -> 835.5 dense
    ("NVIDIA H100 NVL", 835.5e12),
    # H200 SXM: 1,979 TFLOPS with sparsity -> 989.5 dense (same tensor cores as H100 SXM)
    ("NVIDIA H200", 989.5e12),
    # H200 NVL: 1,671 TFLOPS with sparsity -> 835.5 dense
    ("NVIDIA H200 NVL", 835.5e12),
    # A100 (every form factor): 312 TFLOPS dense, 624 with sparsity
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100-SXM4-40GB", 312e12), ("NVIDIA A100-PCIE-40GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    # B200 (HGX B200): 2.25 PFLOPS dense, 4.5 with sparsity
    ("NVIDIA B200", 2.25e15),
    # A30: 165 TFLOPS dense, 330 with sparsity; A40: 149.7 dense, 299.4 with sparsity
    ("NVIDIA A30", 165e12), ("NVIDIA A40", 149.7e12),
    # L4: 242 TFLOPS with sparsity -> 121 dense; L40S: 362.05 dense, 733 with sparsity
    ("NVIDIA L4", 121e12), ("NVIDIA L40S", 362.05e12),
    # GeForce (Ada / Ampere whitepapers, FP32 accumulate, dense): RTX 4090 165.2, RTX 3090 71
    ("NVIDIA GeForce RTX 4090", 165.2e12), ("NVIDIA GeForce RTX 3090", 71e12),
    # AMD Instinct MI300X: 1,307.4 TFLOPS dense BF16 (2,614.9 with sparsity)
    ("AMD Instinct MI300X", 1307.4e12),
    # L40 (no S): 181.05 TFLOPS dense, 362.1 with sparsity (once matched on the L4 row, 121e12)
    ("NVIDIA L40", 181.05e12),
]


@pytest.mark.parametrize("name, flops", DATASHEET_DENSE_BF16)
def test_peak_flops_are_the_datasheet_dense_bf16_values(name, flops):
    # the datasheets round to 3-4 significant digits (and "989.5" is often quoted as 989): 0.1% is rounding
    assert peak_flops_for_gpu(name) == pytest.approx(flops, rel=1e-3)


def test_unknown_gpu_reports_no_mfu_instead_of_guessing():
    assert math.isinf(peak_flops_for_gpu("Some Future Accelerator"))


def test_step_line_fields():
    line = format_step_line(120, 400, 5.8123456, 1.0, 2.9015, 1411.7, 61.234, "epoch: 1 shard: 1 rg: 7", 312.0,
                            726.0)
    assert line == ("step 00120/00400 (30.00%) | loss: 5.812346 | lrm: 1.00 | dt: 2901.50ms | tok/sec: 1,411 | "
                    "mfu: 61.23 | epoch: 1 shard: 1 rg: 7 | total time: 5.20m | eta: 12.1m")
