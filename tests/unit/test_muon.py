import math

import pytest
import torch

from titanlite.optim.muon import Muon
from titanlite.optim.muon_math import POLAR_EXPRESS_COEFFS, orthogonalize

SHAPES = [(64, 32), (32, 64), (48, 48)]  # tall, wide, square


def _reference_muon_step(p, g, buf, second, lr, mu, wd, beta2):
    """One docs/recipe.md §3.3 step on a single 2-D fp32 matrix, written out literally (no stacking, no sharing)."""
    rows, cols = p.shape
    buf = mu * buf + (1 - mu) * g
    u = (1 - mu) * g + mu * buf
    target = torch.linalg.matrix_norm(u) / math.sqrt(rows)
    u = torch.stack([row * (target / max(torch.linalg.vector_norm(row), 1e-6)) for row in u])
    x = u / (torch.linalg.matrix_norm(u) * 1.01 + 1e-6)
    for a, b, c in POLAR_EXPRESS_COEFFS:
        if rows > cols:
            A = x.T @ x
            x = a * x + x @ (b * A + c * A @ A)
        else:
            A = x @ x.T
            x = a * x + (b * A + c * A @ A) @ x
    x = x * math.sqrt(min(rows, cols)) / torch.linalg.matrix_norm(x)
    norm_before = torch.linalg.matrix_norm(x)
    if rows >= cols:
        v = (x * x).mean(dim=1, keepdim=True)
    else:
        v = (x * x).mean(dim=0, keepdim=True)
    second = beta2 * second + (1 - beta2) * v
    x = x / torch.sqrt(torch.clamp(second, min=1e-10))
    x = x * norm_before / torch.linalg.matrix_norm(x)
    lr_eff = lr * math.sqrt(max(1.0, rows / cols))
    mask = (x * p >= 0).float()
    p = p - lr_eff * x - lr_eff * wd * p * mask
    return p, buf, second


@pytest.mark.parametrize("shape", SHAPES)
def test_first_update_is_semi_orthogonal_with_frobenius_sqrt_min(shape):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(shape))
    opt = Muon([p], lr=1.0, momentum=0.0, weight_decay=0.0)
    p.grad = torch.randn(shape)
    opt.step()
    rows, cols = shape
    update = -p.detach() / math.sqrt(max(1.0, rows / cols))  # undo lr_eff = sqrt(max(1, rows/cols))
    assert torch.linalg.matrix_norm(update).item() == pytest.approx(math.sqrt(min(shape)), rel=1e-5)
    singular = torch.linalg.svdvals(update)
    # Polar Express lands singular values in a band around 1 (about 0.84..1.12 before NorMuon's reweighting).
    assert singular.min() > 0.7 and singular.max() < 1.3
    pure = torch.linalg.svdvals(orthogonalize(p.grad[None], 5)[0])
    assert pure.min() > 0.75 and pure.max() < 1.2
    # A random matrix is far from that band: the test would fail for an unorthogonalised update.
    raw = torch.linalg.svdvals(p.grad * math.sqrt(min(shape)) / torch.linalg.matrix_norm(p.grad))
    assert raw.max() / raw.min() > 3


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_literal_reference_over_steps(shape):
    torch.manual_seed(1)
    init = torch.randn(shape) * 0.1
    p = torch.nn.Parameter(init.clone())
    opt = Muon([p], lr=0.02, momentum=0.9, weight_decay=0.3, beta2=0.9)
    ref_p, buf = init.clone(), torch.zeros(shape)
    second = torch.zeros((shape[0], 1) if shape[0] >= shape[1] else (1, shape[1]))
    for step in range(4):
        g = torch.randn(shape)
        mu = 0.85 + 0.03 * step  # hyperparameters change between steps, as the schedule does
        opt.param_groups[0]["momentum"] = mu
        p.grad = g.clone()
        opt.step()
        ref_p, buf, second = _reference_muon_step(ref_p, g, buf, second, 0.02, mu, 0.3, 0.9)
        torch.testing.assert_close(p.detach(), ref_p, atol=1e-5, rtol=0)


def test_groups_by_sorted_shape_and_scales_lr_for_tall_matrices():
    torch.manual_seed(2)
    tall, wide, square = (torch.nn.Parameter(torch.zeros(s)) for s in [(96, 24), (24, 96), (24, 24)])
    params = [square, tall, wide, torch.nn.Parameter(torch.zeros(96, 24))]
    opt = Muon(params, lr=0.1, momentum=0.0)
    assert [g["name"] for g in opt.param_groups] == ["matrices_24x24", "matrices_24x96", "matrices_96x24"]
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1, 2]
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    # Per-element RMS of an update is 1/sqrt(max(m, n)); tall ones move 2x (sqrt(96/24)) by the LR multiplier.
    rms = {tuple(p.shape): p.detach().pow(2).mean().sqrt().item() for p in (tall, wide, square)}
    assert rms[(24, 96)] == pytest.approx(0.1 / math.sqrt(96), rel=1e-4)
    assert rms[(96, 24)] == pytest.approx(2 * 0.1 / math.sqrt(96), rel=1e-4)
    assert rms[(24, 24)] == pytest.approx(0.1 / math.sqrt(24), rel=1e-4)
    assert opt.orthogonalized_matrices == 4


def test_cautious_weight_decay_only_where_update_agrees_with_weight():
    torch.manual_seed(3)
    p0 = torch.randn(16, 16)
    without, with_wd = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    g = torch.randn(16, 16)
    for p, wd in ((without, 0.0), (with_wd, 0.5)):
        opt = Muon([p], lr=0.1, momentum=0.0, weight_decay=wd)
        p.grad = g.clone()
        opt.step()
    update = (p0 - without.detach()) / 0.1
    decayed = (without.detach() - with_wd.detach())
    agree = update * p0 >= 0
    torch.testing.assert_close(decayed[agree], (0.1 * 0.5 * p0)[agree], atol=1e-6, rtol=0)
    assert torch.all(decayed[~agree] == 0) and agree.any() and (~agree).any()


def test_bf16_compute_stays_close_to_fp32_and_keeps_fp32_params():
    torch.manual_seed(4)
    g = torch.randn(64, 32)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        p = torch.nn.Parameter(torch.zeros(64, 32))
        opt = Muon([p], lr=1.0, momentum=0.0, compute_dtype=dtype)
        p.grad = g.clone()
        opt.step()
        assert p.dtype == torch.float32 and opt.state[p]["momentum_buffer"].dtype == torch.float32
        results.append(p.detach())
    assert (results[0] - results[1]).norm() / results[0].norm() < 0.05


def test_zero_gradient_gives_finite_zero_update():
    p = torch.nn.Parameter(torch.ones(8, 4))
    opt = Muon([p], lr=0.1, momentum=0.5, weight_decay=0.0)
    p.grad = torch.zeros(8, 4)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(8, 4))


def test_state_dict_resume_continues_identically():
    def run(params, opt, steps):
        for step in steps:
            gen = torch.Generator().manual_seed(step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()

    torch.manual_seed(5)
    init = [torch.randn(32, 16), torch.randn(16, 32), torch.randn(32, 16)]
    straight = [torch.nn.Parameter(t.clone()) for t in init]
    run(straight, Muon(straight, lr=0.05, momentum=0.9, weight_decay=0.1), range(6))

    first = [torch.nn.Parameter(t.clone()) for t in init]
    opt_first = Muon(first, lr=0.05, momentum=0.9, weight_decay=0.1)
    run(first, opt_first, range(3))
    saved = {k: {n: t.clone() for n, t in v.items()} for k, v in opt_first.state_dict().items()}
    assert set(saved) == {"matrices_16x32.0", "matrices_32x16.0", "matrices_32x16.1"}
    assert saved["matrices_16x32.0"]["second_momentum_buffer"].shape == (1, 32)
    assert saved["matrices_32x16.1"]["second_momentum_buffer"].abs().sum() > 0

    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    opt_resumed = Muon(resumed, lr=0.05, momentum=0.9, weight_decay=0.1)
    opt_resumed.load_state_dict(saved)
    run(resumed, opt_resumed, range(3, 6))
    for a, b in zip(resumed, straight):
        assert torch.equal(a, b)
