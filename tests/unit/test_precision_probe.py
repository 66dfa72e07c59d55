"""scripts.precision_probe's table arithmetic on hand-made gradients (the probe itself needs minutes of compile)."""

import torch

from scripts.precision_probe import error_table, format_table


def test_error_table_and_vanishing_rows():
    ref = {"w": torch.tensor([3.0, 4.0], dtype=torch.float64), "lam": torch.tensor([1e-18], dtype=torch.float64),
           "dead": torch.zeros(2, dtype=torch.float64)}
    grads = {"fp64": ref,
             "fp32": {"w": torch.tensor([3.0, 4.0], dtype=torch.float64), "lam": torch.tensor([2e-9]),
                      "dead": torch.zeros(2)},
             "bf16 eager": {"w": torch.tensor([3.0, 4.1], dtype=torch.float64), "lam": torch.tensor([-3e-9]),
                            "dead": torch.zeros(2)}}
    rows = {r["parameter"]: r for r in error_table(grads)}
    assert rows["w"]["ref_norm"] == 5.0
    assert abs(rows["w"]["rel"]["bf16 eager"] - 0.1 / 5.0) < 1e-12   # ||(0, 0.1)|| / ||(3, 4)||
    assert rows["dead"]["rel"]["fp32"] is None
    text = format_table(list(rows.values()), ["fp32", "bf16 eager"])
    assert "| w | 5 | 0.00 % | 2.00 % |" in text
    assert "| lam | 1e-18 | abs 2e-09 | abs 3e-09 |" in text          # fp32 itself > 50 % off: absolute errors
    assert "dead" not in text                                         # no gradient anywhere: left out
