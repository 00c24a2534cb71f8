"""The audit's library stages, without Prefect: checkpoint resolution, storage options."""

from __future__ import annotations

import pytest

from mergeaudit import audit, store
from mergeaudit.config import parse_config
from mergeaudit.errors import CheckpointError
from mergeaudit.toy import build_toy_family


def config_for(family, results: str, **storage) -> dict:
    return {
        "base": {"name": "base", "uri": family.base},
        "models": [{"name": n, "uri": u, "kind": "rlvr"} for n, u in family.variants.items()],
        "strategies": [{"method": "task_arithmetic"}],
        "results_uri": results,
        "storage": storage,
    }


def test_completion_marker_is_required_when_configured(toy_family, tmp_path):
    cfg = parse_config(config_for(toy_family, str(tmp_path / "r"), completion_marker="_COMPLETE"))
    with pytest.raises(CheckpointError, match="no _COMPLETE"):
        audit.resolve_checkpoints(cfg)
    for uri in [toy_family.base, *toy_family.variants.values()]:
        store.write_bytes(store.join(uri, "_COMPLETE"), b"{}")
    try:
        records = audit.resolve_checkpoints(cfg)
        assert set(records) == {"base", "ft_a", "ft_b"}
    finally:
        for uri in [toy_family.base, *toy_family.variants.values()]:
            store.remove(store.join(uri, "_COMPLETE"))


def test_geometry_and_merges_read_through_the_cache(s3_bucket, tmp_path):
    family = build_toy_family(s3_bucket + "/ck", variants={"rl": 0.1})
    cfg = parse_config(config_for(family, str(tmp_path / "r"), cache_dir=str(tmp_path / "cache"), cache_max_gb=1))
    records = audit.resolve_checkpoints(cfg)
    rows = audit.compute_geometry(cfg, records)["geometry_tensors"]
    assert sum(r["changed_bf16"] for r in rows if r["scope"] == "tensor") == family.changed["rl"]
    assert len(list((tmp_path / "cache").iterdir())) == 2  # base and rl, by fingerprint
    (merge,) = [c for c in audit.plan_candidates(cfg, records) if c.kind == "merge"]
    names = [n for n, _ in audit.candidate_tensors(merge, cfg.storage)]
    assert len(names) == records["base"].n_tensors


def test_probes_become_candidates_and_summaries(toy_family, tmp_path):
    from mergeaudit.audit import CandidateResult, plan_candidates, result_rows
    from mergeaudit.results.fragility import barrier_height

    raw = config_for(toy_family, str(tmp_path / "r"))
    raw["probes"] = {
        "interpolations": [{"a": "base", "b": "ft_a", "alphas": [0, 0.5, 1]}],
        "task_vectors": [{"model": "ft_b", "lambdas": [0, 1, 2]}],
        "perturbation": {"models": ["ft_a"], "gaussian_scales": [0.1], "drop_rates": [0.5], "seeds": 2},
    }
    cfg = parse_config(raw)
    records = audit.resolve_checkpoints(cfg)
    cands = plan_candidates(cfg, records)
    probes_ = [c for c in cands if c.kind == "probe"]
    assert len(probes_) == 3 + 3 + 2 * 2
    assert {c.plan.method for c in probes_} == {"linear", "task_arithmetic", "perturb_gaussian", "dare_linear"}
    # fake scores on the primary metric: a valley in the middle of the interpolation path
    score_of = {c.candidate_id: 0.8 for c in cands}
    for c in probes_:
        if c.probe["family"] == "interpolation" and c.probe["x"] == 0.5:
            score_of[c.candidate_id] = 0.2
        if c.probe["family"] == "gaussian":
            score_of[c.candidate_id] = 0.5
    # a second task whose path is flat
    results = [
        CandidateResult(
            candidate_id=c.candidate_id,
            update_sparsity_bf16=None,
            scores=[
                {
                    "candidate_id": c.candidate_id,
                    "task": task,
                    "metric": "numeric_match",
                    "filter": "verifier",
                    "value": value,
                    "stderr": None,
                    "n": 4,
                }
                for task, value in (("mergeaudit_add2", score_of[c.candidate_id]), ("mergeaudit_sub2", 0.5))
            ],
        )
        for c in cands
    ]
    tables_ = result_rows(cfg, records, {}, cands, results)
    names = {c["candidate_id"]: c for c in tables_["candidates"]}
    noise = next(c for c in tables_["candidates"] if c.get("probe_family") == "gaussian")
    assert (noise["probe_path"], noise["probe_x"], noise["probe_seed"]) == ("ft_a", 0.1, 0)  # settings are columns
    rows = {
        (names[r["candidate_id"]]["name"], r["metric"], r["probe_x"]): r
        for r in tables_["scores"]
        if r["filter"] == "probe" and r["task"] == "mergeaudit_add2"
    }
    assert rows[("probe:interpolation:base~ft_a", "barrier_height", None)]["value"] == pytest.approx(0.6)
    barriers = {r["task"]: r["value"] for r in tables_["scores"] if r["metric"] == "barrier_height"}
    assert barriers == {"mergeaudit_add2": pytest.approx(0.6), "mergeaudit_sub2": pytest.approx(0.0)}  # every task
    drop = rows[("probe:gaussian:ft_a", "score_drop", 0.1)]
    assert drop["value"] == pytest.approx(0.3) and drop["probe_family"] == "gaussian"
    assert rows[("probe:task_vector:ft_b", "best_lambda", None)]["value"] == 0.0
    assert barrier_height([(0.0, 0.5), (0.5, 0.9), (1.0, 0.7)]) == pytest.approx(0.0)


def test_code_tasks_refuse_before_the_candidate_is_built_when_the_sandbox_is_missing(toy_family, tmp_path, monkeypatch):
    from mergeaudit.errors import IsolationError

    cfg = parse_config(
        {**config_for(toy_family, str(tmp_path / "r")), "evaluation": {"tasks": ["mergeaudit_code_mini"], "limit": 2}}
    )
    records = audit.resolve_checkpoints(cfg)
    candidate = audit.plan_candidates(cfg, records)[0]
    monkeypatch.setenv("MERGEAUDIT_BWRAP", "/nonexistent/bwrap")  # as on a worker without bubblewrap
    built = []
    monkeypatch.setattr(audit.evaluations, "materialize", lambda *a, **k: built.append(a))
    with pytest.raises(IsolationError, match="bubblewrap"):
        audit.evaluate_candidate(candidate, cfg.evaluation, cfg.storage)
    assert built == []


def test_noise_probes_scaled_to_the_task_vector_are_their_own_family(toy_family, tmp_path):
    from mergeaudit.checkpoint import Checkpoint
    from mergeaudit.merging.executor import prepare

    raw = config_for(toy_family, str(tmp_path / "r"))
    raw["probes"] = {
        "perturbation": {
            "models": ["ft_a"],
            "gaussian_scales": [0.5],
            "drop_rates": [],
            "seeds": 1,
            "gaussian_scale_to": ["weight_rms", "task_vector"],
        }
    }
    cfg = parse_config(raw)
    probes_ = {
        c.probe["family"]: c for c in audit.plan_candidates(cfg, audit.resolve_checkpoints(cfg)) if c.kind == "probe"
    }
    assert set(probes_) == {"gaussian", "gaussian_task_vector"}
    base, ft = Checkpoint.open(toy_family.base), Checkpoint.open(toy_family.variants["ft_a"])
    for family, on_support_only in (("gaussian", False), ("gaussian_task_vector", True)):
        noisy = dict(prepare(probes_[family].plan).stream())
        moved_off_support = sum(int(((noisy[n] != ft.get(n)) & (ft.get(n) == base.get(n))).sum()) for n in noisy)
        assert (moved_off_support == 0) == on_support_only, family


def test_the_yaml_geometry_section_is_the_settings_the_kernels_take(toy_family, tmp_path):
    """One model from the YAML to the kernels: no adapter can drop a field."""
    from mergeaudit.geometry import GeometrySettings

    raw = config_for(toy_family, str(tmp_path / "r"))
    settings = parse_config({**raw, "geometry": {"principal_alpha": 0.2, "eta": 1e-4}}).geometry
    assert type(settings) is GeometrySettings
    assert (settings.principal_alpha, settings.eta) == (0.2, 1e-4)
    assert parse_config({**raw, "geometry": {"principal_alpha": None}}).geometry.principal_alpha is None
