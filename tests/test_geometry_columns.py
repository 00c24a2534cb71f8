"""The issue-15 geometry columns with known answers: elected-sign disagreement over three
models, principal-weight overlap and lift, Fisher mass shares, dtype mismatches, module scope,
identical models in every dtype."""

from __future__ import annotations

import pytest
import torch

from mergeaudit.checkpoint import Checkpoint, write_checkpoint
from mergeaudit.geometry import GeometrySettings, compute_geometry, module_type
from mergeaudit.schemas import to_arrow

NAME = "model.layers.0.mlp.up_proj.weight"


def ckpt(root, name, tensors):
    return Checkpoint.open(write_checkpoint(str(root / name), tensors.items(), config={"model_type": "llama"}))


def rows_of(rows, **where):
    return [r for r in rows if all(r.get(k) == v for k, v in where.items())]


def test_elected_sign_disagreement_over_three_models(tmp_path):
    base = torch.ones(1000)
    a, b, c = base.clone(), base.clone(), base.clone()
    a[0:100] += 0.5  # against C's -1.0 on 0..49 (elected -), with B's -0.25 on 50..99 (elected +)
    b[50:150] -= 0.25  # loses on 50..99; alone on 100..149
    c[0:50] -= 1.0  # wins on 0..49
    models = {m: ckpt(tmp_path, m, {NAME: t}) for m, t in (("a", a), ("b", b), ("c", c))}
    rows, _ = compute_geometry(ckpt(tmp_path, "base", {NAME: base}), models)
    got = {r["model"]: (r["elected_sign_shared"], r["elected_sign_disagreement"]) for r in rows_of(rows, scope="model")}
    assert got == {"a": (100, 0.5), "b": (50, 1.0), "c": (50, 0.0)}


def principal_family(tmp_path, dtype):
    """W = u v^T (rank 1) with rows 0 and 1 ten times larger: at k = 1 and alpha = 0.1 the
    principal weights are exactly rows 0-1 (100 of 1000 entries)."""
    u = torch.ones(20)
    u[:2] = 10.0
    w = torch.outer(u, torch.ones(50))
    on = w.clone()
    on[0:2] += 0.5  # A: all of the principal rows
    off = w.clone()
    off[5:7] += 0.5  # B: two ordinary rows
    mid = w.clone()
    mid[1:3] += 0.5  # C: one principal row, one ordinary
    t = {"base": w, "a": on, "b": off, "c": mid}
    return {k: ckpt(tmp_path, k, {NAME: v.to(dtype)}) for k, v in t.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_principal_weight_overlap_and_lift(tmp_path, dtype):
    cks = principal_family(tmp_path, dtype)
    settings = GeometrySettings(top_k_fraction=0.05, principal_alpha=0.1)
    rows, _ = compute_geometry(cks.pop("base"), cks, settings=settings)
    got = {r["model"]: r for r in rows_of(rows, scope="tensor")}
    # chance: 100 changed entries x |P| / n = 100 x 100 / 1000 = 10
    assert (got["a"]["principal_overlap"], got["a"]["principal_lift"]) == (100, pytest.approx(10.0))
    assert (got["b"]["principal_overlap"], got["b"]["principal_lift"]) == (0, 0.0)
    assert (got["c"]["principal_overlap"], got["c"]["principal_lift"]) == (50, pytest.approx(5.0))
    assert got["c"]["principal_overlap_share"] == 0.5 and got["c"]["principal_overlap_chance"] == pytest.approx(0.1)
    assert all(r["principal_alpha"] == 0.1 for r in got.values())
    (model_c,) = rows_of(rows, scope="model", model="c")
    assert model_c["principal_lift"] == pytest.approx(5.0)


def test_fisher_mass_on_overlap_and_exclusive_entries(tmp_path):
    w = torch.ones(20, 50)
    a, b = w.clone(), w.clone()
    a[0:2] += 0.5  # rows 0, 1
    b[1:3] -= 0.5  # rows 1, 2: overlap row 1
    fa = torch.ones(20, 50)
    fa[0] = 2.0  # A's Fisher: 1050 in all, 50 on the overlap, 100 on its exclusive row 0
    fb = torch.full((20, 50), 3.0)
    fisher = {"a": ckpt(tmp_path, "fa", {NAME: fa}), "b": ckpt(tmp_path, "fb", {NAME: fb})}
    models = {"a": ckpt(tmp_path, "a", {NAME: a}), "b": ckpt(tmp_path, "b", {NAME: b})}
    _, pairs = compute_geometry(ckpt(tmp_path, "w", {NAME: w}), models, fisher=fisher)
    for scope in ("tensor", "layer", "module", "global"):
        (p,) = rows_of(pairs, scope=scope)
        assert p["fisher_a_overlap_share"] == pytest.approx(50 / 1050)
        assert p["fisher_a_exclusive_share"] == pytest.approx(100 / 1050)
        assert p["fisher_b_overlap_share"] == pytest.approx(0.05)
        assert p["fisher_b_exclusive_share"] == pytest.approx(0.05)
    _, without = compute_geometry(ckpt(tmp_path, "w2", {NAME: w}), models)
    assert all(p["fisher_a_overlap_share"] is None for p in without)


def test_a_dtype_mismatch_is_reported_not_compared(tmp_path):
    w = torch.randn(64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    base = ckpt(tmp_path, "base", {"x": w, "y": w})
    ft = ckpt(tmp_path, "ft", {"x": w.to(torch.float16), "y": w})  # an fp16 conversion of x
    ft2 = ckpt(tmp_path, "ft2", {"x": w, "y": w})
    rows, pairs = compute_geometry(base, {"ft": ft, "ft2": ft2})
    reasons = {(r["model"], r["tensor"]): r["reason"] for r in rows_of(rows, scope="tensor")}
    assert reasons[("ft", "x")] == "dtype F16 vs base BF16: not compared"
    assert reasons[("ft2", "x")] is None and reasons[("ft", "y")] is None
    assert {p["tensor"] for p in rows_of(pairs, scope="tensor")} == {"y"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_an_identical_model_shows_no_update_at_all(tmp_path, dtype):
    g = torch.Generator().manual_seed(1)
    tensors = {NAME: torch.randn(96, 64, generator=g).to(dtype), "model.norm.weight": torch.ones(64, dtype=dtype)}
    rows, _ = compute_geometry(
        ckpt(tmp_path, "b", tensors),
        {"same": ckpt(tmp_path, "s", tensors)},
        settings=GeometrySettings(top_k_fraction=0.05),
    )
    (mat,) = rows_of(rows, scope="tensor", tensor=NAME)
    assert mat["changed_bf16"] == mat["changed_rel"] == mat["changed_abs"] == 0 and mat["sparsity_bf16"] == 1.0
    assert mat["angle_left_max_deg"] == mat["angle_right_max_deg"] == mat["spectral_drift"] == 0.0
    assert mat["update_rank"] == 0 and mat["principal_changed"] == 0 and mat["principal_lift"] is None


def test_module_scope_rows(toy_family):
    base = Checkpoint.open(toy_family.base)
    models = {n: Checkpoint.open(u) for n, u in toy_family.variants.items()}
    rows, pairs = compute_geometry(base, models, settings=GeometrySettings(spectral=False))
    for name in models:
        mods = rows_of(rows, scope="module", model=name)
        assert {r["module"] for r in mods} == {"attention", "mlp", "norm", "embedding"}
        assert sum(r["changed_bf16"] for r in mods) == toy_family.changed[name]
        assert sum(r["n_tensors"] for r in mods) == len(base.keys())
    assert {p["module"] for p in rows_of(pairs, scope="module")} == {"attention", "mlp", "norm", "embedding"}
    assert to_arrow("geometry_tensors", rows).num_rows == len(rows)


def test_module_types_from_tensor_names():
    cases = {
        "self_attn.q_proj": "attention",
        "self_attn.o_proj": "attention",
        "mlp.down_proj": "mlp",
        "input_layernorm": "norm",
        "post_attention_layernorm": "norm",
        "norm": "norm",
        "embed_tokens": "embedding",
        "lm_head": "embedding",
        "attn.c_attn": "attention",
        "mlp.c_fc": "mlp",
        "ln_1": "norm",
        "wte": "embedding",
        "rotary_emb.inv_freq": "other",
    }
    assert {m: module_type(m) for m in cases} == cases


def test_elected_sign_can_be_switched_off(tmp_path):
    base = torch.ones(100)
    models = {m: ckpt(tmp_path, m, {NAME: base + 0.5}) for m in ("a", "b")}
    rows, _ = compute_geometry(
        ckpt(tmp_path, "base", {NAME: base}), models, settings=GeometrySettings(spectral=False, elected_sign=False)
    )
    assert all(r["elected_sign_shared"] is None and r["elected_sign_disagreement"] is None for r in rows)


@pytest.mark.parametrize("n_models", [2, 3, 4, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_elected_sign_kernels_agree_with_a_torch_reference(n_models, dtype):
    from mergeaudit.geometry.stats import changed_bf16, tensor_sums

    g = torch.Generator().manual_seed(n_models)
    base = torch.randn(50_001, generator=g).to(dtype)
    fts = [
        (base.float() + (torch.rand(50_001, generator=g) < 0.4) * torch.randn(50_001, generator=g) * 0.1).to(dtype)
        for _ in range(n_models)
    ]
    masks = torch.stack([changed_bf16(base, f) for f in fts])
    deltas = torch.stack([f.float() - base.float() for f in fts])
    total = (deltas * masks).sum(0)
    shared = masks & (masks.sum(0) >= 2)
    disagree = shared & ~(deltas * total > 0)
    got = tensor_sums(base, fts).models
    assert [m.elect_shared for m in got] == shared.sum(1).tolist()
    assert [m.elect_disagree for m in got] == disagree.sum(1).tolist()
