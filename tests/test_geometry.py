"""Geometry: bf16 update sparsity and norms, with known answers."""

from __future__ import annotations

import pytest
import torch

from mergeaudit.checkpoint import Checkpoint
from mergeaudit.geometry import changed_bf16, geometry_rows, parse_tensor_name, summarize, tensor_geometry


def test_updates_below_bf16_resolution_count_as_unchanged():
    base = torch.tensor([1.0, 1.0, 1.0, 0.0, -2.0], dtype=torch.float32)
    ft = base.clone()
    ft[0] += 1e-4   # far below bf16's step of 2**-7 at 1.0: unchanged after the cast
    ft[1] += 2**-6  # two bf16 steps: changed
    ft[3] = -0.0    # sign of zero flips the bits: changed under the bitwise definition
    mask = changed_bf16(base, ft)
    assert mask.tolist() == [False, True, False, True, False]
    g = tensor_geometry(base, ft)
    assert g["changed_bf16"] == 2 and g["sparsity_bf16"] == pytest.approx(0.6)


def test_norms_match_a_hand_computation():
    base = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    ft = base + torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    g = tensor_geometry(base, ft)
    assert g["update_norm"] == pytest.approx(1.0)
    assert g["base_norm"] == pytest.approx(5.0)
    assert g["rel_update_norm"] == pytest.approx(0.2)


def test_toy_family_densities_are_measured_exactly(toy_family):
    base = Checkpoint.open(toy_family.base)
    models = {n: Checkpoint.open(u) for n, u in toy_family.variants.items()}
    rows = geometry_rows(base, models)
    assert len(rows) == len(base.keys()) * len(models)
    summary = summarize(rows)
    for name in models:
        changed = sum(r["changed_bf16"] for r in rows if r["model"] == name)
        assert changed == toy_family.changed[name]
        assert summary[name]["sparsity_bf16"] == pytest.approx(1 - toy_family.density(name))


def test_mismatched_tensors_get_rows_with_reasons(tmp_path):
    from mergeaudit.checkpoint import write_checkpoint

    cfg = {"model_type": "llama"}
    base = Checkpoint.open(write_checkpoint(str(tmp_path / "b"), [("x", torch.ones(3)), ("y", torch.ones(2))], config=cfg))
    ft = Checkpoint.open(write_checkpoint(str(tmp_path / "f"), [("x", torch.ones(4)), ("z", torch.ones(2))], config=cfg))
    reasons = {r["tensor"]: r["reason"] for r in geometry_rows(base, {"ft": ft})}
    assert reasons == {"x": "shape [4] vs base [3]", "y": "missing in model", "z": "not in base"}


def test_tensor_names_parse_to_layer_and_module():
    assert parse_tensor_name("model.layers.12.self_attn.q_proj.weight") == (12, "self_attn.q_proj")
    assert parse_tensor_name("model.embed_tokens.weight") == (None, "embed_tokens")
    assert parse_tensor_name("lm_head.weight") == (None, "lm_head")
