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
