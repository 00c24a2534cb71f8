"""SAR merging: an expert's Fisher scale alone does not decide conflicts, hand-computed
arbitration, sparsification, both rescaling rules and the global lambda."""

from __future__ import annotations

import pydantic
import pytest
import torch

from mergeaudit.merging import REGISTRY, TensorSlot
from mergeaudit.merging.params import resolve


def sar(base, *models, fisher=None, **shared) -> torch.Tensor:
    t = lambda v: v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=torch.float32)  # noqa: E731
    m = REGISTRY.get("sar")
    slot = TensorSlot(
        "w",
        t(base),
        tuple(t(x) for x in models),
        tuple(f"m{i}" for i in range(len(models))),
        tuple(t(f) for f in fisher) if fisher else None,
        0,
    )
    p = resolve(m, "model.layers.0.mlp.up_proj.weight", 0.0, shared, [{}] * len(models))
    out = m.fn(slot, p)
    out.info = slot.info  # type: ignore[attr-defined]
    return out


def conflict_pair(n: int = 200_000, seed: int = 0):
    """Two sparse updates (30% density each, Gaussian values) and Fisher of the same shape and scale."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, generator=g) * (torch.rand(n, generator=g) < 0.3)
    b = torch.randn(n, generator=g) * (torch.rand(n, generator=g) < 0.3)
    return torch.zeros(n), a, b, torch.rand(n, generator=g), torch.rand(n, generator=g)


def a_share(out, a, b) -> float:
    """Share of the conflicting entries (both updated, opposite signs) where a's sign won."""
    conflict = (a != 0) & (b != 0) & (a.sign() != b.sign())
    assert int(conflict.sum()) > 5000
    return float((out[conflict].sign() == a[conflict].sign()).float().mean())


@pytest.mark.parametrize("arbitration", ["fisher_sign_average", "winner_take_all"])
def test_fisher_scale_alone_does_not_decide_conflicts(arbitration):
    base, a, b, fa, fb = conflict_pair()
    common = {"density": 1.0, "rescale": "none", "arbitration": arbitration}
    at_1 = sar(base, a, b, fisher=[fa, fb], **common)
    at_100 = sar(base, a, b, fisher=[fa * 100, fb], **common)
    share_1, share_100 = a_share(at_1, a, b), a_share(at_100, a, b)
    assert 0.45 < share_1 < 0.55
    assert abs(share_100 - share_1) < 0.005, f"x100 Fisher wins {share_100:.3f} of conflicts, x1 {share_1:.3f}"
    assert torch.allclose(at_100, at_1, rtol=1e-5, atol=1e-6)
    # the raw scales (the behaviour before normalisation) let the x100 expert win ~92%
    raw = sar(base, a, b, fisher=[fa * 100, fb], fisher_normalize="none", **common)
    assert a_share(raw, a, b) > 0.85


def test_arbitration_by_hand_with_normalised_fisher():
    base, a, b = [0.0] * 4, [1.0, 0.0, 2.0, -1.0], [0.0, 3.0, 1.0, 2.0]
    # per-model means 3 and 7/4: Fa -> [1/3, 1/3, 1/3, 3], Fb -> [4/7, 4/7, 16/7, 4/7]
    fisher = [[1.0, 1.0, 1.0, 9.0], [1.0, 1.0, 4.0, 1.0]]
    common = {"density": 1.0, "rescale": "none", "fisher_floor": 0.0}
    for scale in (1.0, 100.0):
        f = [[v * scale for v in fisher[0]], fisher[1]]
        # index 2: s_a = 4/3 < s_b = 16/7 -> b's 1; index 3: s_a = 3 > s_b = 16/7 -> a's -1
        wta = sar(base, a, b, fisher=f, arbitration="winner_take_all", **common)
        assert wta.tolist() == pytest.approx([1.0, 3.0, 1.0, -1.0]) and wta.info["conflicts"] == 0.25
        # index 2: both positive -> (1/3 * 2 + 16/7 * 1) / (1/3 + 16/7) = 62/55;
        # index 3: elected sign of -s_a + s_b = -3 + 16/7 < 0 -> only a agrees
        avg = sar(base, a, b, fisher=f, **common)
        assert avg.tolist() == pytest.approx([1.0, 3.0, 62 / 55, -1.0], rel=1e-6)
        assert avg.info["conflicts"] == 0.25 and avg.info["exclusive"] == 0.5 and avg.info["overlap"] == 0.5
    # with the raw scales (as before): index 2 ties at s = 4 and goes to the first model
    raw = sar(base, a, b, fisher=fisher, arbitration="winner_take_all", fisher_normalize="none", **common)
    assert raw.tolist() == pytest.approx([1.0, 3.0, 2.0, -1.0])
    raw_avg = sar(base, a, b, fisher=fisher, fisher_normalize="none", **common)
    assert raw_avg.tolist() == pytest.approx([1.0, 3.0, 6 / 5, -1.0])


def test_a_model_without_fisher_mass_keeps_its_exclusive_updates():
    # Fa is all zero: it gets the floor (0.01 x the unit mean) alone; Fb normalises to 1 + 0.01
    out = sar(
        [0.0, 0.0],
        [1.0, 2.0],
        [0.0, -1.0],
        fisher=[[0.0, 0.0], [3.0, 3.0]],
        density=1.0,
        fisher_floor=0.01,
        arbitration="winner_take_all",
    )
    assert out.tolist() == pytest.approx([1.0, -1.0])  # s_a = 0.04 < s_b = 1.01 at the overlap


def test_sparsification_both_rescaling_rules_and_lambda():
    base, a, b = [1.0] * 4, [5.0, 1.0, 2.0, 1.0], [1.0, -2.0, 1.0, 3.0]
    # exclusive updates only: merged [4, -3, 1, 2], support 4, L1 10; density 0.5 keeps 4 and -3 (L1 7)
    common = {"sensitivity": "magnitude", "density": 0.5}
    l1 = sar(base, a, b, rescale="l1", **common)
    assert (l1 - 1).tolist() == pytest.approx([40 / 7, -30 / 7, 0.0, 0.0])
    assert l1.info["rescale"] == pytest.approx(10 / 7) and l1.info["density_achieved"] == 0.5
    inv = sar(base, a, b, rescale="inverse_density", **common)
    assert (inv - 1).tolist() == pytest.approx([8.0, -6.0, 0.0, 0.0]) and inv.info["rescale"] == 2.0
    none = sar(base, a, b, rescale="none", **common)
    assert (none - 1).tolist() == pytest.approx([4.0, -3.0, 0.0, 0.0]) and none.info["rescale"] == 1.0
    half = sar(base, a, b, rescale="l1", **{"lambda": 0.5}, **common)
    assert (half - 1).tolist() == pytest.approx([20 / 7, -15 / 7, 0.0, 0.0])
    # lambda scales the merged update, exclusive entries included, with nothing dropped
    full = sar(base, a, b, sensitivity="magnitude", density=1.0, **{"lambda": 2.0})
    assert (full - 1).tolist() == pytest.approx([8.0, -6.0, 2.0, 4.0])


def test_params():
    params = REGISTRY.get("sar").params
    assert params.model_validate({"rescale": True}).rescale == "l1"
    assert params.model_validate({"rescale": False}).rescale == "none"
    assert params.model_validate({"lambda": 0.7}).lambda_ == 0.7
    p = params.model_validate({})
    assert (p.rescale, p.lambda_, p.fisher_normalize, p.density) == ("l1", 1.0, "mean", 0.9)
    with pytest.raises(pydantic.ValidationError):
        params.model_validate({"rescale": "sqrt"})
    with pytest.raises(pydantic.ValidationError):
        params.model_validate({"fisher_normalize": "sum"})
    assert params.model_validate({"fisher_floor": -1.0}).check(2) == ["fisher_floor must be >= 0 (got -1.0)"]
