"""Spectral figures: known answers, and the randomized path's documented error bounds."""

from __future__ import annotations

import pytest
import torch

from mergeaudit.geometry.spectral import (
    SpectralSettings,
    principal_angles_deg,
    spectral_figures,
)

EXACT = SpectralSettings(top_k_fraction=0.05, exact_max_dim=4096)
RANDOMIZED = SpectralSettings(top_k_fraction=0.05, exact_max_dim=4)


def basis(n: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed)))[0]


def weight(m=80, n=60):
    """W = U diag(s) V^T with a clear gap after the top 3 directions (k = 3 at 5%)."""
    u, v = basis(m, 1)[:, :n], basis(n, 2)
    s = torch.cat([torch.tensor([10.0, 9.0, 8.0]), torch.linspace(1.0, 0.1, n - 3)])
    return u @ torch.diag(s) @ v.T, u, v


@pytest.mark.parametrize("settings", [EXACT, RANDOMIZED], ids=["exact", "randomized"])
def test_update_inside_the_top_subspace(settings):
    w, u, v = weight()
    d = 0.5 * torch.outer(u[:, 0], v[:, 1]) + 0.25 * torch.outer(u[:, 2], v[:, 0])
    f = spectral_figures(w, w + d, None, settings)
    assert f["topk"] == 3
    assert f["energy_topk_left"] == pytest.approx(1.0, abs=1e-3)
    assert f["energy_topk_right"] == pytest.approx(1.0, abs=1e-3)
    assert f["stable_rank"] == pytest.approx((0.25 + 0.0625) / 0.25, rel=1e-2)


@pytest.mark.parametrize("settings", [EXACT, RANDOMIZED], ids=["exact", "randomized"])
def test_update_orthogonal_to_the_top_subspace(settings):
    w, u, v = weight()
    d = 0.1 * torch.outer(u[:, 40], v[:, 50])
    f = spectral_figures(w, w + d, None, settings)
    assert f["energy_topk_left"] == pytest.approx(0.0, abs=1e-3)
    assert f["energy_topk_right"] == pytest.approx(0.0, abs=1e-3)
    assert f["stable_rank"] == pytest.approx(1.0, rel=1e-3)
    assert f["angle_left_max_deg"] < 1.0 and f["angle_right_max_deg"] < 1.0  # the top-3 span is unmoved


def test_principal_angles_of_known_subspaces():
    q = basis(6, 3)
    assert principal_angles_deg(q[:, :2], q[:, :2]).tolist() == pytest.approx([0.0, 0.0], abs=1e-3)
    assert principal_angles_deg(q[:, :2], q[:, 2:4]).tolist() == pytest.approx([90.0, 90.0], abs=1e-3)
    mixed = torch.stack([q[:, 0], (q[:, 1] + q[:, 2]) / 2**0.5], dim=1)
    assert principal_angles_deg(q[:, :2], mixed).tolist() == pytest.approx([0.0, 45.0], abs=1e-3)


def test_randomized_error_within_documented_bounds():
    g = torch.Generator().manual_seed(0)
    m, n, rank = 1536, 1024, 32
    u = torch.linalg.qr(torch.randn(m, rank, generator=g))[0]
    v = torch.linalg.qr(torch.randn(n, rank, generator=g))[0]
    w = torch.randn(m, n, generator=g) / n**0.5 + u @ torch.diag(torch.linspace(8, 3, rank)) @ v.T
    d = (torch.rand(m, n, generator=g) < 0.1) * torch.randn(m, n, generator=g) * 0.02
    exact = spectral_figures(w, w + d, None, SpectralSettings(exact_max_dim=4096))
    rand = spectral_figures(w, w + d, None, SpectralSettings(exact_max_dim=16))
    assert (exact["spectral_method"], rand["spectral_method"]) == ("exact", "randomized")
    for key in ("energy_topk_left", "energy_topk_right"):
        assert rand[key] == pytest.approx(exact[key], abs=1e-3)
    for key in ("angle_left_max_deg", "angle_right_max_deg", "angle_left_mean_deg", "angle_right_mean_deg"):
        assert rand[key] == pytest.approx(exact[key], abs=1.0)
    assert rand["stable_rank"] == pytest.approx(exact["stable_rank"], rel=0.03)


def test_randomized_svd_leaves_the_global_generator_alone():
    from mergeaudit.geometry.spectral import SpectralSettings, spectral_figures

    g = torch.Generator().manual_seed(5)
    w = torch.randn(300, 200, generator=g)
    settings = SpectralSettings(top_k_fraction=0.05, exact_max_dim=10)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = spectral_figures(w, w + 0.01 * torch.randn(300, 200, generator=g), None, settings)
    assert torch.equal(torch.rand(3), expected), "the global RNG state is untouched"
    assert first["spectral_method"] == "randomized"
