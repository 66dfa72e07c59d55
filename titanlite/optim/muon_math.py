"""The Muon update direction for a stack of whole matrices (K, rows, cols), docs/recipe.md §3.3 steps 3-7.

Pure tensor functions, no communication: the distributed optimizer calls them only on the matrices a rank
owns. Order matters (recipe gotcha 11): row-equilibrate -> normalise (x1.01) -> Polar Express -> snap the
Frobenius norm to sqrt(min(m, n)) -> NorMuon variance reduction with norm preservation.
"""

from __future__ import annotations

import math

import torch

# Per-iteration (a, b, c) of the Polar Express polynomial X <- aX + (bA + cA^2)X, A = X X^T.
# The first ones are aggressive (pull tiny singular values up), the last ones settle them near 1.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def _frobenius(x: torch.Tensor) -> torch.Tensor:
    """Per-matrix Frobenius norm in fp32, shaped (K, 1, 1) for broadcasting."""
    return x.float().norm(dim=(-2, -1), keepdim=True)


def row_equilibrate(u: torch.Tensor) -> torch.Tensor:
    """MuonEq: give every row the same norm ||u||_F / sqrt(rows) (norms in fp32), keep u's dtype."""
    uf = u.float()
    target = _frobenius(uf) / math.sqrt(u.shape[-2])
    row_norms = uf.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return (uf * (target / row_norms)).to(u.dtype)


def polar_express(x: torch.Tensor, ns_steps: int) -> torch.Tensor:
    """Approximate the polar factor of each matrix of x (already scaled to spectral norm < 1).

    Runs in x's dtype (bf16 when compute is bf16). Wide/square matrices iterate on the small X X^T, tall ones
    on X^T X, so the Gram matrix is always min(m, n) square.
    """
    coeffs = POLAR_EXPRESS_COEFFS[:ns_steps]
    # More steps than published coefficients: the last (settling) polynomial is a fixed-point map near 1.
    coeffs = coeffs + (POLAR_EXPRESS_COEFFS[-1],) * max(0, ns_steps - len(coeffs))
    if x.shape[-2] > x.shape[-1]:  # tall
        for a, b, c in coeffs:
            gram = x.mT @ x
            poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.baddbmm(x, x, poly, beta=a, alpha=1.0)
    else:  # wide or square
        for a, b, c in coeffs:
            gram = x @ x.mT
            poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.baddbmm(x, poly, x, beta=a, alpha=1.0)
    return x


def orthogonalize(u: torch.Tensor, ns_steps: int, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Steps 3-6: MuonEq, normalise, Polar Express, Muon+ rescale to ||.||_F = sqrt(min(m, n))."""
    u = row_equilibrate(u)
    x = u / (_frobenius(u) * 1.01 + 1e-6).to(u.dtype)
    x = polar_express(x, ns_steps).to(out_dtype)
    target = math.sqrt(min(x.shape[-2], x.shape[-1]))
    return x * (target / _frobenius(x).clamp_min(1e-10)).to(out_dtype)


def normuon_variance_reduction(g: torch.Tensor, second_moment: torch.Tensor, beta2: float) -> torch.Tensor:
    """Step 7: scale rows (tall/square) or columns (wide) by 1/sqrt(EMA of their mean square), keep ||g||_F.

    `second_moment` is (K, rows, 1) or (K, 1, cols) fp32 and is updated in place; no bias correction.
    """
    rows, cols = g.shape[-2], g.shape[-1]
    reduce_dim = -1 if rows >= cols else -2
    mean_square = g.float().square().mean(dim=reduce_dim, keepdim=True)
    second_moment.lerp_(mean_square, 1.0 - beta2)
    scaled = g.float() * second_moment.clamp_min(1e-10).rsqrt()
    keep_norm = _frobenius(g) / _frobenius(scaled).clamp_min(1e-10)
    return (scaled * keep_norm).to(g.dtype)


def second_moment_shape(rows: int, cols: int) -> tuple[int, int]:
    return (rows, 1) if rows >= cols else (1, cols)


def muon_direction(u: torch.Tensor, second_moment: torch.Tensor, beta2: float, ns_steps: int) -> torch.Tensor:
    """Steps 3-7 on a (K, rows, cols) stack of Nesterov momenta; returns the fp32 update direction."""
    return normuon_variance_reduction(orthogonalize(u, ns_steps), second_moment, beta2)
