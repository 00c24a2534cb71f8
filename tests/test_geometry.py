"""Update geometry: masks, norms and pairwise figures with known answers, and the streamed
tables over real checkpoints."""

from __future__ import annotations

import pytest
import torch

from mergeaudit.checkpoint import Checkpoint, write_checkpoint
from mergeaudit.geometry import GeometrySettings, compute_geometry, parse_tensor_name
from mergeaudit.geometry.stats import changed_bf16, tensor_sums

N = 10_000


def base_tensor(n: int = N) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, generator=g) + 0.1).to(torch.bfloat16)


def with_update(base: torch.Tensor, idx: torch.Tensor, sign: torch.Tensor | float = 1.0) -> torch.Tensor:
    """base with a +-10% (of |w| + 0.01) update on idx: always visible in bf16."""
    w = base.float().clone()
    w[idx] += sign * 0.1 * (w[idx].abs() + 0.01)
    return w.to(torch.bfloat16)


def test_updates_below_bf16_resolution_count_as_unchanged():
    base = torch.tensor([1.0, 1.0, 1.0, 0.0, -2.0], dtype=torch.float32)
    ft = base.clone()
    ft[0] += 1e-4  # far below bf16's step of 2**-7 at 1.0: unchanged after the cast
    ft[1] += 2**-6  # two bf16 steps: changed
    ft[3] = -0.0  # +0 -> -0: equal values, no update (Mukherjee et al., Zhu et al.)
    assert changed_bf16(base, ft).tolist() == [False, True, False, False, False]
    m = tensor_sums(base, [ft]).models[0].derived()
    assert m["changed_bf16"] == 1 and m["sparsity_bf16"] == pytest.approx(0.8)
    # the rel and abs masks also compare bf16-cast values: the 1e-4 update is invisible to them
    assert m["changed_abs"] == 1 and m["changed_rel"] == 1
    # the norms keep the stored values
    assert m["update_norm"] == pytest.approx((1e-4**2 + 2**-12) ** 0.5, rel=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sign_of_zero_is_no_update_in_any_dtype(dtype):
    base = torch.tensor([0.0, -0.0, 0.0, 1.0], dtype=dtype)
    ft = torch.tensor([-0.0, 0.0, 0.0, 1.0], dtype=dtype)
    sums = tensor_sums(base, [ft, ft.clone()])
    assert [m.changed_bf16 for m in sums.models] == [0, 0]
    assert sums.pairs[(0, 1)].overlap == 0 and sums.models[0].changed_abs == sums.models[0].changed_rel == 0


def test_rel_and_abs_masks():
    # on the bf16 grid: 1.0 has a step of 2**-7, 2**-10 one of 2**-17 (7.6e-6)
    base = torch.tensor([1.0, 1.0, 2**-10, 2**-10])
    ft = base + torch.tensor([2**-7, 2**-9, 2**-17, 2**-15])
    m = tensor_sums(base, [ft], eta=1e-3, abs_tol=1e-5).models[0]
    # 2**-9 rounds away in bf16; rel: 2**-7 and both steps at 2**-10 exceed 1e-3 relative;
    # abs: 2**-17 = 7.6e-6 < 1e-5, the others above
    assert m.changed_bf16 == 3 and m.changed_rel == 3 and m.changed_abs == 2


def test_norms_match_a_hand_computation():
    base = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    ft = base + torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    m = tensor_sums(base, [ft]).models[0].derived()
    assert m["update_norm"] == pytest.approx(1.0)
    assert m["base_norm"] == pytest.approx(5.0)
    assert m["rel_update_norm"] == pytest.approx(0.2)


def test_masks_of_chosen_density_and_overlap():
    base = base_tensor()
    a_idx, b_idx = torch.arange(0, 3000), torch.arange(2000, 4000)
    # on the overlap [2000, 3000) B's update has the opposite sign of A's for the first half
    b_sign = torch.where(b_idx < 2500, -1.0, 1.0)
    p = tensor_sums(base, [with_update(base, a_idx), with_update(base, b_idx, b_sign)]).pairs[(0, 1)].derived()
    assert (p["changed_a"], p["changed_b"], p["overlap"]) == (3000, 2000, 1000)
    chance = 3000 * 2000 / N
    assert p["overlap_chance"] == pytest.approx(chance)
    assert p["overlap_of_a"] == pytest.approx(1000 / 3000) and p["overlap_of_a_chance"] == pytest.approx(0.2)
    assert p["overlap_of_b"] == pytest.approx(0.5) and p["overlap_of_b_chance"] == pytest.approx(0.3)
    assert p["overlap_of_a_lift"] == pytest.approx((1000 / 3000) / 0.2)
    assert p["jaccard"] == pytest.approx(1000 / 4000)
    assert p["jaccard_chance"] == pytest.approx(chance / (5000 - chance))
    assert p["jaccard_lift"] == pytest.approx(0.25 / (chance / (5000 - chance)))
    assert p["sign_conflict_rate"] == pytest.approx(0.5)


def test_orthogonal_and_opposite_updates():
    base = base_tensor()
    a = with_update(base, torch.arange(0, 1000))
    disjoint = tensor_sums(base, [a, with_update(base, torch.arange(5000, 6000))]).pairs[(0, 1)].derived()
    assert disjoint["overlap"] == 0 and disjoint["cosine"] == pytest.approx(0.0, abs=1e-9)
    assert disjoint["cosine_overlap"] is None and disjoint["sign_conflict_rate"] is None
    assert disjoint["overlap_of_a_lift"] == 0.0
    opposite = 2 * base.float() - a.float()  # exactly -delta_a, computed in fp32
    p = tensor_sums(base.float(), [a.float(), opposite]).pairs[(0, 1)].derived()
    assert p["cosine"] == pytest.approx(-1.0) and p["cosine_overlap"] == pytest.approx(-1.0)
    assert p["sign_conflict_rate"] == 1.0 and p["norm_ratio"] == pytest.approx(1.0)
    assert p["overlap_of_a"] == 1.0


def test_chunking_does_not_change_the_answer(monkeypatch):
    from mergeaudit.geometry import stats

    base = base_tensor()
    fts = [with_update(base, torch.arange(0, N, 3)), with_update(base, torch.arange(0, N, 7), -1.0)]
    whole = tensor_sums(base, fts)
    monkeypatch.setattr(stats, "CHUNK", 999)
    chunked = tensor_sums(base, fts)
    assert chunked.models[0].derived() == pytest.approx(whole.models[0].derived())
    assert chunked.pairs[(0, 1)].derived() == pytest.approx(whole.pairs[(0, 1)].derived())


def _ckpt(root, name, tensors):
    return Checkpoint.open(write_checkpoint(str(root / name), tensors.items(), config={"model_type": "llama"}))


def test_toy_family_tables(toy_family):
    base = Checkpoint.open(toy_family.base)
    models = {n: Checkpoint.open(u) for n, u in toy_family.variants.items()}
    tensor_rows, pair_rows = compute_geometry(base, models, {"ft_a": "rlvr", "ft_b": "sft"})
    per_tensor = [r for r in tensor_rows if r["scope"] == "tensor"]
    assert len(per_tensor) == len(base.keys()) * 2
    for name in models:
        changed = sum(r["changed_bf16"] for r in per_tensor if r["model"] == name)
        assert changed == toy_family.changed[name]
        (summary,) = [r for r in tensor_rows if r["scope"] == "model" and r["model"] == name]
        assert summary["changed_bf16"] == changed
        assert summary["sparsity_bf16_numel_weighted"] == pytest.approx(1 - toy_family.density(name))
        mine = [r for r in per_tensor if r["model"] == name]  # Mukherjee et al.: unweighted over tensors
        assert summary["sparsity_bf16"] == pytest.approx(sum(r["sparsity_bf16"] for r in mine) / len(mine))
        assert summary["n_tensors"] == len(mine)
        layers = [r for r in tensor_rows if r["scope"] == "layer" and r["model"] == name]
        assert sorted(r["layer"] for r in layers) == [0, 1]
    assert {r["kind"] for r in tensor_rows if r["model"] == "ft_a"} == {"rlvr"}
    two_d = [r for r in per_tensor if r["tensor"].endswith("q_proj.weight")]
    assert all(r["spectral_method"] == "exact" and 0 <= r["energy_topk_left"] <= 1 for r in two_d)
    norms = [r for r in per_tensor if r["tensor"].endswith("norm.weight")]
    assert norms and all(r.get("spectral_method") is None for r in norms)
    from mergeaudit.schemas import to_arrow

    assert to_arrow("geometry_tensors", tensor_rows).num_rows == len(tensor_rows)  # rows fit the schema
    assert to_arrow("geometry_pairs", pair_rows).num_rows == len(pair_rows)
    (glob,) = [r for r in pair_rows if r["scope"] == "global"]
    assert glob["overlap"] == sum(r["overlap"] for r in pair_rows if r["scope"] == "tensor")
    # independent random masks: the overlap is what chance predicts
    assert glob["overlap_of_a_lift"] == pytest.approx(1.0, abs=0.1)
    assert glob["sign_conflict_rate"] == pytest.approx(0.5, abs=0.05)


def test_spectral_figures_can_be_switched_off(toy_family):
    base = Checkpoint.open(toy_family.base)
    rows, _ = compute_geometry(
        base, {"a": Checkpoint.open(toy_family.variants["ft_a"])}, settings=GeometrySettings(spectral=False)
    )
    assert all(r.get("stable_rank") is None for r in rows)


def test_mismatched_tensors_get_rows_with_reasons(tmp_path):
    base = _ckpt(tmp_path, "b", {"x": torch.ones(3), "y": torch.ones(2), "w": torch.ones(4)})
    ft = _ckpt(tmp_path, "f", {"x": torch.ones(4), "z": torch.ones(2), "w": torch.full((4,), 2.0)})
    ft2 = _ckpt(tmp_path, "g", {"x": torch.ones(3), "y": torch.ones(2), "w": torch.full((4,), 3.0)})
    rows, pairs = compute_geometry(base, {"ft": ft, "ft2": ft2})
    reasons = {(r["model"], r["tensor"]): r["reason"] for r in rows if r["scope"] == "tensor"}
    assert reasons == {
        ("ft", "x"): "shape [4] vs base [3]",
        ("ft", "y"): "missing in model",
        ("ft", "z"): "not in base",
        ("ft", "w"): None,
        ("ft2", "x"): None,
        ("ft2", "y"): None,
        ("ft2", "w"): None,
    }
    assert {r["tensor"] for r in pairs if r["scope"] == "tensor"} == {"w"}


def test_tensor_names_parse_to_layer_and_module():
    assert parse_tensor_name("model.layers.12.self_attn.q_proj.weight") == (12, "self_attn.q_proj")
    assert parse_tensor_name("model.embed_tokens.weight") == (None, "embed_tokens")
    assert parse_tensor_name("lm_head.weight") == (None, "lm_head")


def reference(base: torch.Tensor, fa: torch.Tensor, fb: torch.Tensor, eta=1e-3, tol=1e-5) -> dict:
    """The same statistics in plain torch, unchunked, as the kernels' oracle."""
    b, a, c = base.double(), fa.double(), fb.double()
    da, dc = a - b, c - b
    b16, a16 = base.to(torch.bfloat16).double(), fa.to(torch.bfloat16).double()  # masks: bf16-cast values
    ma, mc = changed_bf16(base, fa), changed_bf16(base, fb)
    inter = ma & mc
    return {
        "changed_bf16": int(ma.sum()),
        "changed_rel": int(((a16 - b16).abs() > eta * torch.maximum(b16.abs(), a16.abs())).sum()),
        "changed_abs": int(((a16 - b16).abs() > tol).sum()),
        "update_sq": float((da * da).sum()),
        "overlap": int(inter.sum()),
        "sign_conflicts": int(((da * dc < 0) & inter).sum()),
        "dot": float((da * dc).sum()),
        "overlap_dot": float((da * dc)[inter].sum()),
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kernels_agree_with_a_plain_torch_reference(dtype):
    g = torch.Generator().manual_seed(5)
    n = 300_001  # not a multiple of the chunk
    base = torch.randn(n, generator=g).to(dtype)
    fts = [
        (base.float() + (torch.rand(n, generator=g) < p) * torch.randn(n, generator=g) * 0.03).to(dtype)
        for p in (0.1, 0.3)
    ]
    sums = tensor_sums(base, fts)
    ref = reference(base, *fts)
    m, p = sums.models[0], sums.pairs[(0, 1)]
    assert (m.changed_bf16, m.changed_rel, m.changed_abs) == (
        ref["changed_bf16"],
        ref["changed_rel"],
        ref["changed_abs"],
    )
    assert (p.overlap, p.sign_conflicts) == (ref["overlap"], ref["sign_conflicts"])
    assert m.update_sq == pytest.approx(ref["update_sq"], rel=1e-4)
    assert p.dot == pytest.approx(ref["dot"], rel=1e-3, abs=1e-6)
    assert p.overlap_dot == pytest.approx(ref["overlap_dot"], rel=1e-3, abs=1e-6)


def test_non_finite_weights_show_as_nan_norms():
    base = torch.ones(1000)
    ft = base.clone()
    ft[3] = float("nan")
    m = tensor_sums(base, [ft]).models[0].derived()
    assert m["changed_bf16"] == 1 and m["update_norm"] != m["update_norm"]
