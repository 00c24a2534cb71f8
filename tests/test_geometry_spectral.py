"""Spectral figures: known answers from synthetic matrices with chosen singular values and angles,
and the randomized path's documented error bounds."""

from __future__ import annotations

import math

import pytest
import torch

from mergeaudit.geometry.settings import GeometrySettings
from mergeaudit.geometry.spectral import (
    decompose,
    principal_angles_deg,
    principal_mask,
    spectral_figures,
    update_spectrum,
)

EXACT = GeometrySettings(top_k_fraction=0.05, exact_max_dim=4096, exact_max_cost=1 << 62)
RANDOMIZED = GeometrySettings(top_k_fraction=0.05, exact_max_dim=4)


def basis(n: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0].to(dtype)


def weight(m=80, n=60):
    """W = U diag(s) V^T with a clear gap after the top 3 directions (k = 3 at 5%)."""
    u, v = basis(m, 1)[:, :n], basis(n, 2)
    s = torch.cat([torch.tensor([10.0, 9.0, 8.0]), torch.linspace(1.0, 0.1, n - 3)])
    return u @ torch.diag(s) @ v.T, u, v


def rotated(q: torch.Tensor, i: int, j: int, deg: float) -> torch.Tensor:
    """q with columns i and j turned by `deg` degrees in their plane (still orthonormal)."""
    t = math.radians(deg)
    out = q.clone()
    out[:, i] = math.cos(t) * q[:, i] + math.sin(t) * q[:, j]
    out[:, j] = -math.sin(t) * q[:, i] + math.cos(t) * q[:, j]
    return out


@pytest.mark.parametrize("deg", [0.0, 1e-3, 1e-2, 0.05, 0.1, 1.0, 10.0, 45.0, 80.0, 89.99, 90.0])
def test_principal_angles_accurate_to_1e_4_degrees(deg):
    q = basis(50, 3, torch.float64)
    a = q[:, :4]
    b = rotated(q, 1, 10, deg)[:, :4]
    angles = principal_angles_deg(a, b).tolist()
    assert angles == pytest.approx([0.0, 0.0, 0.0, deg], abs=1e-4)
    # from fp32 bases too (the subspaces a decomposition of fp32 weights returns)
    angles32 = principal_angles_deg(a.float(), b.float()).tolist()
    assert angles32[-1] == pytest.approx(deg, abs=1e-4 if deg < 89 else 1e-3)


def test_principal_angles_of_known_subspaces():
    q = basis(6, 3)
    assert principal_angles_deg(q[:, :2], q[:, :2]).tolist() == pytest.approx([0.0, 0.0], abs=1e-5)  # fp32 bases
    assert principal_angles_deg(q[:, :2], q[:, 2:4]).tolist() == pytest.approx([90.0, 90.0], abs=1e-4)
    mixed = torch.stack([q[:, 0], (q[:, 1] + q[:, 2]) / 2**0.5], dim=1)
    assert principal_angles_deg(q[:, :2], mixed).tolist() == pytest.approx([0.0, 45.0], abs=1e-4)


@pytest.mark.parametrize("deg", [1e-3, 0.05, 0.1, 2.0, 10.0])
@pytest.mark.parametrize("settings", [EXACT, RANDOMIZED], ids=["exact", "randomized"])
def test_weights_with_a_chosen_rotation_of_their_top_subspace(settings, deg):
    """W' = U' S V^T where U' turns one top direction by `deg`: the left angle is deg, the right 0,
    the spectrum is unchanged (drift 0)."""
    m, n = 120, 90
    u, v = basis(m, 4, torch.float64)[:, :n], basis(n, 5, torch.float64)
    s = torch.cat([torch.tensor([10.0, 9.0, 8.0, 7.0]), torch.linspace(1.0, 0.1, n - 4)]).double()
    w = u @ torch.diag(s) @ v.T
    w_ft = rotated(u, 0, 50, deg) @ torch.diag(s) @ v.T
    settings = GeometrySettings(
        top_k_fraction=4 / 90, exact_max_dim=settings.exact_max_dim, exact_max_cost=settings.exact_max_cost
    )
    f = spectral_figures(w.float(), w_ft.float(), None, settings)
    assert f["topk"] == 4
    # measured: exact within 1e-7 degrees, randomized within 2e-5 (from fp32 W and W')
    assert f["angle_left_max_deg"] == pytest.approx(deg, abs=1e-4)
    assert f["angle_right_max_deg"] == pytest.approx(0.0, abs=1e-4)
    assert f["spectral_drift"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("settings", [EXACT, RANDOMIZED], ids=["exact", "randomized"])
def test_identical_weights_give_exactly_zero(settings, dtype):
    w = weight()[0].to(dtype).float()
    f = spectral_figures(w, w.clone(), None, settings)
    assert f["angle_left_max_deg"] == f["angle_right_max_deg"] == f["spectral_drift"] == 0.0
    assert f["update_rank"] == 0 and f["stable_rank"] is None


@pytest.mark.parametrize("settings", [EXACT, RANDOMIZED], ids=["exact", "randomized"])
def test_update_inside_the_top_subspace(settings):
    w, u, v = weight()
    d = 0.5 * torch.outer(u[:, 0], v[:, 1]) + 0.25 * torch.outer(u[:, 2], v[:, 0])
    f = spectral_figures(w, w + d, None, settings)
    assert f["topk"] == 3
    assert f["energy_topk"] == pytest.approx(1.0, abs=1e-3)
    assert f["energy_topk_left"] == pytest.approx(1.0, abs=1e-3)
    assert f["energy_topk_right"] == pytest.approx(1.0, abs=1e-3)
    assert f["stable_rank"] == pytest.approx((0.25 + 0.0625) / 0.25, rel=1e-4)
    assert f["update_rank"] == 2 and f["update_rank_ratio"] == pytest.approx(2 / 60)


@pytest.mark.parametrize("settings", [EXACT, RANDOMIZED], ids=["exact", "randomized"])
def test_one_sided_update_has_no_two_sided_energy(settings):
    """D = u_0 v_40^T: all its energy in the left top span, none in the right one nor the block."""
    w, u, v = weight()
    f = spectral_figures(w, w + 0.3 * torch.outer(u[:, 0], v[:, 40]), None, settings)
    assert f["energy_topk_left"] == pytest.approx(1.0, abs=1e-3)
    assert f["energy_topk_right"] == pytest.approx(0.0, abs=1e-3)
    assert f["energy_topk"] == pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize("settings", [EXACT, RANDOMIZED], ids=["exact", "randomized"])
def test_update_orthogonal_to_the_top_subspace(settings):
    w, u, v = weight()
    d = 0.1 * torch.outer(u[:, 40], v[:, 50])
    f = spectral_figures(w, w + d, None, settings)
    assert f["energy_topk"] == pytest.approx(0.0, abs=1e-3)
    assert f["stable_rank"] == pytest.approx(1.0, rel=1e-4) and f["update_rank"] == 1
    assert f["angle_left_max_deg"] < 1e-3 and f["angle_right_max_deg"] < 1e-3  # the top-3 span is unmoved
    assert f["spectral_drift"] == pytest.approx(0.0, abs=1e-5)


def test_spectral_drift_of_a_chosen_spectrum_change():
    w, u, v = weight()
    s_new = torch.tensor([11.0, 9.0, 8.0])  # sigma_1 10 -> 11, the rest unchanged
    d = 1.0 * torch.outer(u[:, 0], v[:, 0])
    f = spectral_figures(w, w + d, None, EXACT)
    expected = 1.0 / float(torch.tensor([10.0, 9.0, 8.0]).norm())
    assert f["spectral_drift"] == pytest.approx(expected, rel=1e-5)
    assert s_new.numel() == 3


def test_update_rank_of_chosen_singular_values():
    """D = sum_i s_i x_i y_i^T with 7 non-zero singular values spread over six decades."""
    x, y = basis(200, 7)[:, :7], basis(150, 8)[:, :7]
    s = torch.tensor([1.0, 0.5, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5]) * 3
    d = x @ torch.diag(s) @ y.T
    spectrum = update_spectrum(d)
    assert spectrum[:7].tolist() == pytest.approx(s.tolist(), rel=1e-3)
    w = torch.randn(200, 150, generator=torch.Generator().manual_seed(1))
    f = spectral_figures(w, w + d, None, EXACT)
    # torch.linalg.matrix_rank's fp32 default: sigma > max(m, n) * eps * sigma_1 = 200 * 1.19e-7 * 3 = 7.2e-5
    assert f["update_rank"] == int(torch.linalg.matrix_rank(d)) == 6
    assert f["update_rank_ratio"] == pytest.approx(6 / 150)


@pytest.mark.slow
def test_randomized_error_within_documented_bounds():
    g = torch.Generator().manual_seed(0)
    m, n, rank = 1536, 1024, 32
    u = torch.linalg.qr(torch.randn(m, rank, generator=g))[0]
    v = torch.linalg.qr(torch.randn(n, rank, generator=g))[0]
    w = torch.randn(m, n, generator=g) / n**0.5 + u @ torch.diag(torch.linspace(8, 3, rank)) @ v.T
    d = (torch.rand(m, n, generator=g) < 0.1) * torch.randn(m, n, generator=g) * 0.02
    exact = spectral_figures(w, w + d, None, GeometrySettings(exact_max_dim=4096, exact_max_cost=1 << 62))
    rand = spectral_figures(w, w + d, None, GeometrySettings())
    assert (exact["spectral_method"], rand["spectral_method"]) == ("exact", "randomized")
    for key in ("energy_topk", "energy_topk_left", "energy_topk_right"):
        assert rand[key] == pytest.approx(exact[key], abs=1e-3)
    for key in ("angle_left_max_deg", "angle_right_max_deg", "angle_left_mean_deg", "angle_right_mean_deg"):
        assert rand[key] == pytest.approx(exact[key], abs=1.0)
    assert rand["spectral_drift"] == pytest.approx(exact["spectral_drift"], abs=1e-3)
    assert rand["stable_rank"] == exact["stable_rank"] and rand["update_rank"] == exact["update_rank"]


def test_method_is_chosen_by_cost():
    s = GeometrySettings()
    assert s.exact((128, 896)) and s.exact((300, 300))
    assert not s.exact((896, 896)) and not s.exact((4864, 896)) and not s.exact((151936, 896))


def test_principal_mask_keeps_the_top_alpha_of_the_rank_k_reconstruction():
    w, u, v = weight()
    base = decompose(w, 3, EXACT)
    mask = principal_mask(base, tuple(w.shape), 0.1)
    assert int(mask.sum()) == math.ceil(0.1 * w.numel())
    recon = (u[:, :3] * torch.tensor([10.0, 9.0, 8.0])) @ v[:, :3].T
    assert bool(recon.abs()[mask].min() >= recon.abs()[~mask].max())


def test_randomized_svd_leaves_the_global_generator_alone():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(300, 200, generator=g)
    settings = GeometrySettings(top_k_fraction=0.05, exact_max_dim=10)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = spectral_figures(w, w + 0.01 * torch.randn(300, 200, generator=g), None, settings)
    assert torch.equal(torch.rand(3), expected), "the global RNG state is untouched"
    assert first["spectral_method"] == "randomized"


@pytest.mark.parametrize("keep", [1, 7, 1000, 250_000, 4_999_999])
def test_kth_largest_of_a_large_tensor_is_exact(keep):
    from mergeaudit.geometry.spectral import _kth_largest

    x = torch.randn(5_000_000, generator=torch.Generator().manual_seed(keep)).abs()
    assert float(_kth_largest(x, keep)) == float(x.kthvalue(x.numel() - keep + 1).values)
