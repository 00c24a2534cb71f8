"""Spectral figures of a 2-D update: rank, drift, and alignment with the base's principal directions.

For a base weight W (m x n), a fine-tuned weight W' and the update D = W' - W (all fp32 in; the
small matrices below in fp64):

- `update_rank`: the number of singular values of D above max(m, n) * eps(fp32) * sigma_1(D),
  torch.linalg.matrix_rank's default for an fp32 matrix (Mukherjee et al., arXiv 2505.11711,
  report RL updates as nearly full rank); `update_rank_ratio` = update_rank / min(m, n). Exact:
  eigenvalues of the fp64 Gram matrix of D restricted to its non-zero rows and columns (which
  cannot change the rank), so a sparse update costs only its support;
- `stable_rank`: ||D||_F^2 / sigma_1(D)^2, sigma_1 from the same exact spectrum;
- `energy_topk`: the share of ||D||_F^2 in the two-sided block of W's top-k singular subspaces,
  ||U_k^T D V_k||_F^2 / ||D||_F^2 (Zhu et al., arXiv 2511.08567, "off-principal" updates have a
  small share); `energy_topk_left` / `_right` keep the one-sided shares ||U_k^T D||_F^2 and
  ||D V_k||_F^2 (over ||D||_F^2), which say on which side an update leaves the principal span;
- principal angles between the top-k left (right) singular subspaces of W and W', max and mean in
  degrees: atan2(sin, cos) of the fp64 singular values of (I - U U^T) U' (sines) and U^T U'
  (cosines): within 1e-4 degrees over 0-90 (tests), ~2e-6 degrees from fp32 bases (their
  orthonormality error); the arccos of fp32 cosines alone was quantized at 0.03-0.09 degrees. An
  identical W' (D = 0) gives exactly 0, as does its drift;
- `spectral_drift`: ||s_k(W') - s_k(W)||_2 / ||s_k(W)||_2 over the top-k singular values (Zhu
  et al.'s "spectrum preservation": RLVR keeps the spectrum, SFT distorts it).

k is `top_k_fraction` of min(m, n), at least 1. The exact SVD (fp64) is used when it is cheap:
min(m, n) <= `exact_max_dim` and m * n * min(m, n) <= `exact_max_cost`; otherwise the randomized
range finder of Halko, Martinsson & Tropp (torch.svd_lowrank's algorithm, with a local generator
so the global RNG is never reseeded), q = k + `oversample` columns, `power_iters` power
iterations, Rayleigh-Ritz in fp64. The base's decomposition is computed once per tensor and shared
by every fine-tune: each fine-tune's range finder starts from the base's right sketch basis (W' is
close to W, so `warm_iters` iterations suffice instead of `power_iters`).

Measured accuracy of the randomized path against the exact fp64 SVD (benchmarks/bench_geometry.py
--accuracy; tests/test_geometry_spectral.py checks looser bounds): on 896 x 896 and 4864 x 896
weights with a power-law spectrum (s_i ~ i^-0.7) and a 10%-dense update, 3 seeds, k = 9: principal
angles within 7.4e-5 degrees (max) and 2.3e-5 (mean), energy shares within 5e-9, spectral drift
within 1e-7; update and stable rank are exact on both paths. On W' = W with one top direction
turned by 1e-3 to 10 degrees (spectral gap at k): the exact path within 1e-7 degrees, the
randomized one within 2e-5. With a weak gap at k (a rank-32 spike over noise, 1536 x 1024, k = 10)
angles differ by up to 1 degree (max), as the top-k subspace is ill-defined there; energy shares
within 1e-3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mergeaudit.geometry.settings import GeometrySettings

FP32_EPS = torch.finfo(torch.float32).eps
SAMPLE_ABOVE, SAMPLE_SIZE = 1 << 22, 1 << 18  # principal masks of larger tensors bound their threshold first
GRAM_ROWS = 16384  # rows of an update converted to fp64 at a time (bounded memory for embeddings)


@dataclass(frozen=True)
class Decomposition:
    """Top-k singular triplets of one matrix (fp64), plus the sketch basis a warm start reuses."""

    u: torch.Tensor  # m x k
    s: torch.Tensor  # k
    v: torch.Tensor  # n x k
    sketch: torch.Tensor | None  # n x q right basis of the randomized path (fp32), None if exact
    method: str


def decompose(w: torch.Tensor, k: int, settings: GeometrySettings, warm: Decomposition | None = None) -> Decomposition:
    """Top-k singular triplets of w (fp32 in); `warm`, the base's decomposition, seeds the sketch."""
    if settings.exact(tuple(w.shape)):
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        return Decomposition(u[:, :k], s[:k], vh[:k].T, None, "exact")
    q = min(k + settings.oversample, min(w.shape))
    if warm is not None and warm.sketch is not None:
        start, iters = warm.sketch, settings.warm_iters
    else:
        gen = torch.Generator(device=w.device).manual_seed(settings.seed)
        start = torch.randn(w.shape[1], q, dtype=w.dtype, device=w.device, generator=gen)
        iters = settings.power_iters
    u, s, v, sketch = _range_finder(w, start, iters)
    return Decomposition(u[:, :k], s[:k], v[:, :k], sketch, "randomized")


def _range_finder(a: torch.Tensor, start: torch.Tensor, niter: int):
    """Halko et al. 2011 with `niter` power iterations from the n x q test matrix `start`;
    the final Rayleigh-Ritz step in fp64."""
    basis = torch.linalg.qr(a @ start).Q
    right = start
    for _ in range(niter):
        right = torch.linalg.qr(a.mT @ basis).Q
        basis = torch.linalg.qr(a @ right).Q
    u, s, vh = torch.linalg.svd((basis.mT @ a).double(), full_matrices=False)
    return basis.double() @ u, s, vh.mT, right


def principal_angles_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles (degrees, ascending) between the column spans of orthonormal a and b.

    cos from svdvals(a^T b), sin from svdvals(b - a a^T b), both fp64; the angle is atan2(sin,
    cos) pairing the i-th smallest sine with the i-th largest cosine (Bjorck & Golub; Knyazev &
    Argentati), accurate near 0 degrees (where arccos loses half the digits) and near 90.
    """
    a, b = a.double(), b.double()
    proj = a.T @ b
    cos = torch.linalg.svdvals(proj).clamp(0.0, 1.0)  # descending
    sin = torch.linalg.svdvals(b - a @ proj).clamp(0.0, 1.0).flip(0)  # ascending
    p = min(a.shape[1], b.shape[1])
    return torch.rad2deg(torch.atan2(sin[:p], cos[:p])).sort().values


def update_spectrum(d: torch.Tensor) -> torch.Tensor:
    """Singular values of d (descending, fp64), exactly, from the Gram matrix of its support."""
    nz = d.ne(0)
    rows, cols = nz.any(dim=1), nz.any(dim=0)
    del nz
    sub = d
    if not bool(rows.all()):  # all-zero rows (untouched embedding rows) cannot add to the rank
        sub = sub[rows]
    if not bool(cols.all()):
        sub = sub[:, cols]
    if sub.numel() == 0:
        return torch.zeros(0, dtype=torch.float64)
    if sub.shape[0] < sub.shape[1]:
        sub = sub.mT
    gram = torch.zeros(sub.shape[1], sub.shape[1], dtype=torch.float64)
    for start in range(0, sub.shape[0], GRAM_ROWS):  # fp64 a block of rows at a time
        block = sub[start : start + GRAM_ROWS].double()
        gram += block.mT @ block
    return torch.linalg.eigvalsh(gram).clamp_min(0.0).sqrt().flip(0)


def spectral_figures(
    w: torch.Tensor,
    w_ft: torch.Tensor,
    base: Decomposition | None,
    settings: GeometrySettings,
    finite: bool | None = None,
) -> dict[str, float | int | str | None]:
    """All spectral columns for one (model, 2-D tensor); inputs in fp32.

    `base` (from `decompose(w, k, settings)`) lets the caller decompose W once for all fine-tunes;
    `finite`, when the caller already knows whether the update is finite, saves a pass.
    """
    shape = tuple(w.shape)
    k = settings.k(shape)
    base = base if base is not None else decompose(w, k, settings)
    d = w_ft - w
    out: dict[str, float | int | str | None] = {"topk": k, "spectral_method": base.method}
    if not (finite if finite is not None else bool(torch.isfinite(d).all())):
        return out  # a NaN or Inf update: the norms already show it; no spectrum to speak of
    spectrum = update_spectrum(d)
    energy = float(spectrum.square().sum())
    if energy == 0:  # identical weights (up to the sign of zero): same subspaces and spectrum
        out.update(
            update_rank=0,
            update_rank_ratio=0.0,
            stable_rank=None,
            energy_topk=None,
            energy_topk_left=None,
            energy_topk_right=None,
            angle_left_max_deg=0.0,
            angle_left_mean_deg=0.0,
            angle_right_max_deg=0.0,
            angle_right_mean_deg=0.0,
            spectral_drift=0.0,
        )
        return out
    sigma1 = float(spectrum[0])
    rank = int((spectrum > max(shape) * FP32_EPS * sigma1).sum())
    # the k-column products in fp32 (no fp64 copy of a large D), their squares summed in fp64
    u32, v32 = base.u.float(), base.v.float()
    ud = (u32.T @ d).double()
    out.update(
        update_rank=rank,
        update_rank_ratio=rank / min(shape),
        stable_rank=energy / sigma1**2,
        energy_topk=float((ud @ base.v).square().sum()) / energy,
        energy_topk_left=float(ud.square().sum()) / energy,
        energy_topk_right=float((d @ v32).double().square().sum()) / energy,
    )
    ft = decompose(w_ft, k, settings, warm=base)
    left, right = principal_angles_deg(base.u, ft.u), principal_angles_deg(base.v, ft.v)
    drift = float((ft.s - base.s).norm() / base.s.norm()) if float(base.s.norm()) > 0 else None
    out.update(
        angle_left_max_deg=float(left.max()),
        angle_left_mean_deg=float(left.mean()),
        angle_right_max_deg=float(right.max()),
        angle_right_mean_deg=float(right.mean()),
        spectral_drift=drift,
    )
    return out


def principal_mask(base: Decomposition, shape: tuple[int, int], alpha: float) -> torch.Tensor:
    """Zhu et al.'s principal weights: the top-`alpha` fraction of entries of |U_k S_k V_k^T|,
    the magnitude of the base's rank-k reconstruction (a boolean m x n mask; ties at the
    threshold are all kept)."""
    recon = ((base.u * base.s).float() @ base.v.float().T).abs_().reshape(-1)
    n = recon.numel()
    keep = max(1, min(n, int(math.ceil(alpha * n))))
    return (recon >= _kth_largest(recon, keep)).reshape(shape)


def _kth_largest(x: torch.Tensor, keep: int) -> torch.Tensor:
    """The keep-th largest value of a 1-D tensor, exactly. Large tensors first bound it from a
    strided sample and select among the few entries above the bound (a full kthvalue of a
    136M-entry embedding costs seconds)."""
    n = x.numel()
    if n > SAMPLE_ABOVE:
        sample = x[:: n // SAMPLE_SIZE]
        frac = min(1.0, keep / n + 5 * (keep / n) ** 0.5 / SAMPLE_SIZE**0.5 + 1e-4)  # ~5 sd of slack
        lower = sample.kthvalue(max(1, sample.numel() - int(frac * sample.numel()))).values
        above = x[x >= lower]
        if above.numel() >= keep:  # the bound held: the keep-th largest is among these
            return above.kthvalue(above.numel() - keep + 1).values
    return x.kthvalue(n - keep + 1).values
