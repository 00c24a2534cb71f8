"""The served backend as the audit uses it: a merge candidate written to a temporary folder,
scored through `transformers serve` (the same completions as the in-process HF path), the
server stopped and the folder removed; refusals come before anything is built."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from mergeaudit import audit
from mergeaudit.config import parse_config
from mergeaudit.errors import EvaluationError


def config_for(family, results: str, **evaluation) -> dict:
    return {
        "base": {"name": "base", "uri": family.base},
        "models": [{"name": n, "uri": u, "kind": "rlvr"} for n, u in family.variants.items()],
        "strategies": [{"method": "ties", "params": {"density": 0.5}}],
        "results_uri": results,
        "evaluation": {"tasks": ["mergeaudit_add2"], "limit": 6, **evaluation},
    }


@pytest.mark.integration
def test_merge_candidate_through_a_served_model(toy_family, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    tempfile.tempdir = None  # TMPDIR is read again
    try:
        served = parse_config(
            config_for(toy_family, str(tmp_path / "r"), backend="served", server={"startup_timeout": 300})
        )
        records = audit.resolve_checkpoints(served)
        (merge,) = [c for c in audit.plan_candidates(served, records) if c.kind == "merge"]
        result = audit.evaluate_candidate(merge, served.evaluation, served.storage)
        assert list((tmp_path / "tmp").iterdir()) == []  # the candidate's folder and the server's log are gone
    finally:
        tempfile.tempdir = None
    hf = parse_config(config_for(toy_family, str(tmp_path / "r")))
    local = audit.evaluate_candidate(merge, hf.evaluation, hf.storage)
    by_doc = {s["doc_id"]: s["completion"] for s in local.samples}
    assert len(result.samples) == 6 and {s["doc_id"]: s["completion"] for s in result.samples} == by_doc
    assert result.update_sparsity_bf16 == pytest.approx(local.update_sparsity_bf16)
    assert {s["metric"] for s in result.scores} >= {"numeric_match", "avg@1", "outcome_truncated"}
    assert all(s["candidate_id"] == merge.candidate_id for s in result.samples)


def test_refusals_come_before_the_candidate_is_built(toy_family, tmp_path):
    cfg = parse_config(config_for(toy_family, str(tmp_path / "r"), chat_template=True))
    records = audit.resolve_checkpoints(cfg)
    (merge,) = [c for c in audit.plan_candidates(cfg, records) if c.kind == "merge"]
    with pytest.raises(EvaluationError, match="has no chat template"):
        audit.evaluate_candidate(merge, cfg.evaluation, cfg.storage)
    if not Path("/dev/nvidia0").exists():
        gpu = parse_config(config_for(toy_family, str(tmp_path / "r"), device="cuda"))
        with pytest.raises(EvaluationError, match="no CUDA device"):
            audit.evaluate_candidate(merge, gpu.evaluation, gpu.storage)
