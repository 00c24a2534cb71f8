"""Spectral figures of a 2-D update: is it aligned with the base weight's principal directions?

For a base weight W (m x n), a fine-tuned weight W' and the update D = W' - W:

- `stable_rank`: ||D||_F^2 / sigma_1(D)^2, the effective number of directions the update uses;
- `energy_topk_left` / `_right`: the share of ||D||_F^2 inside the span of W's top-k left
  (right) singular vectors, ||U_k^T D||_F^2 / ||D||_F^2 (resp. ||D V_k||_F^2 / ||D||_F^2). A
  random update has share ~ k/m (k/n); an update along W's principal directions has share ~1;
- principal angles between the top-k left (right) singular subspaces of W and W': the
  arccos of the singular values of U_k^T U'_k, reported as max and mean in degrees.

k is `top_k_fraction` of min(m, n), at least 1. Matrices with min(m, n) <= `exact_max_dim` use
the exact SVD (torch.linalg.svd, matrix_norm(ord=2)). Larger ones use the randomized range
finder of Halko, Martinsson & Tropp (torch.svd_lowrank's algorithm, with a local generator so the
global RNG is never reseeded) with q = k + `oversample` columns and
`power_iters` power iterations for the subspaces, and q = 32 with twice the iterations for
sigma_1(D) (an update's spectrum is often flat, where sigma_1 converges slowly).

Measured error of the randomized path against the exact SVD (1536 x 1024 weights shaped like
trained ones: a rank-32 spike over Gaussian noise; a 10%-dense random update plus a rank-1 part;
k = 10, q = 20, 4 iterations; 3 seeds; tests/test_geometry_spectral.py checks these bounds):
energy shares within 1e-4 absolute, principal angles within 0.21 degrees (max) and 0.04 (mean),
stable rank within 1.3%. When W has no spectral gap at k (pure noise), the top-k subspace is
ill-defined: the energy shares still agree within 3e-4, but the angles can differ by up to 45
degrees (max) and 7 (mean), as the exact angles are themselves unstable there. A 1536 x 1024
tensor takes 0.6 s exact and 0.04 s randomized on 2 cores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SpectralSettings:
    top_k_fraction: float = 0.01
    exact_max_dim: int = 1024
    oversample: int = 10
    power_iters: int = 4
    seed: int = 0

    def k(self, shape: tuple[int, ...]) -> int:
        return max(1, int(round(self.top_k_fraction * min(shape))))

    def exact(self, shape: tuple[int, ...]) -> bool:
        return min(shape) <= self.exact_max_dim


def top_k_subspaces(w: torch.Tensor, k: int, settings: SpectralSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal bases (m x k, n x k) of the top-k left and right singular subspaces of w."""
    if settings.exact(tuple(w.shape)):
        u, _, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :k], vh[:k].T
    q = min(k + settings.oversample, min(w.shape))
    u, _, v = svd_lowrank(w, q=q, niter=settings.power_iters, seed=settings.seed)
    return u[:, :k], v[:, :k]


def svd_lowrank(a: torch.Tensor, q: int, niter: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.svd_lowrank's algorithm (Halko et al. 2011, range finder with `niter` power
    iterations), with its Gaussian test matrix drawn from a local generator: torch's version
    draws from the global RNG, and reseeding that would change every later draw of the caller."""
    gen = torch.Generator(device=a.device).manual_seed(seed)
    r = torch.randn(a.shape[-1], q, dtype=a.dtype, device=a.device, generator=gen)
    basis = torch.linalg.qr(a @ r).Q
    for _ in range(niter):
        basis = torch.linalg.qr(a.mT @ basis).Q
        basis = torch.linalg.qr(a @ basis).Q
    u, s, vh = torch.linalg.svd(basis.mT @ a, full_matrices=False)
    return basis @ u, s, vh.mT


def top_singular_value(d: torch.Tensor, settings: SpectralSettings) -> float:
    if settings.exact(tuple(d.shape)):
        return float(torch.linalg.matrix_norm(d, ord=2))
    # An update's spectrum is often flat (sparse, noise-like), where sigma_1 converges slowly:
    # a wider sketch and twice the power iterations (measured: 0.4% low vs 4% with q=8, 4 its).
    _, s, _ = svd_lowrank(d, q=min(32, min(d.shape)), niter=2 * settings.power_iters, seed=settings.seed)
    return float(s[0])


def principal_angles_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles (degrees, ascending) between the column spans of orthonormal a and b."""
    cos = torch.linalg.svdvals(a.T @ b).clamp(0.0, 1.0)
    return torch.rad2deg(torch.arccos(cos)).sort().values


def spectral_figures(
    w: torch.Tensor,
    w_ft: torch.Tensor,
    base_subspaces: tuple[torch.Tensor, torch.Tensor] | None,
    settings: SpectralSettings,
) -> dict[str, float | int | str | None]:
    """All spectral columns for one (model, 2-D tensor); inputs in fp32.

    `base_subspaces` lets the caller compute W's subspaces once for all fine-tuned models.
    """
    k = settings.k(tuple(w.shape))
    u, v = base_subspaces if base_subspaces is not None else top_k_subspaces(w, k, settings)
    d = w_ft - w
    energy = float(d.square().sum())
    out: dict[str, float | int | str | None] = {
        "topk": k,
        "spectral_method": "exact" if settings.exact(tuple(w.shape)) else "randomized",
    }
    if energy > 0 and math.isfinite(energy):
        sigma1 = top_singular_value(d, settings)
        out["stable_rank"] = energy / sigma1**2 if sigma1 > 0 else None
        out["energy_topk_left"] = float((u.T @ d).square().sum()) / energy
        out["energy_topk_right"] = float((d @ v).square().sum()) / energy
    else:
        out.update(stable_rank=None, energy_topk_left=None, energy_topk_right=None)
    u_ft, v_ft = top_k_subspaces(w_ft, k, settings)
    left, right = principal_angles_deg(u, u_ft), principal_angles_deg(v, v_ft)
    out.update(
        angle_left_max_deg=float(left.max()),
        angle_left_mean_deg=float(left.mean()),
        angle_right_max_deg=float(right.max()),
        angle_right_mean_deg=float(right.mean()),
    )
    return out
