"""The rows of a run's tables (mergeaudit.schemas) built from the audit's records."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
from typing import Any

import mergeaudit
from mergeaudit.audit.records import Candidate, CandidateResult, CheckpointRecord
from mergeaudit.config import AuditConfig
from mergeaudit.results import fragility
from mergeaudit.results.scores import RunResults

PACKAGES = ("torch", "transformers", "lm_eval", "prefect", "safetensors", "pyarrow", "s3fs", "fsspec")


def package_versions() -> dict[str, str]:
    out = {"mergeaudit": mergeaudit.__version__}
    for pkg in PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def candidate_rows(
    candidates: list[Candidate], results: list[CandidateResult], failures: dict[str, str] | None = None
) -> list[dict]:
    sparsity = {r.candidate_id: r.update_sparsity_bf16 for r in results}
    failures = failures or {}
    return [
        {
            "candidate_id": c.candidate_id,
            "name": c.name,
            "kind": c.kind,
            "method": c.method,
            "params_json": json.dumps(c.params, sort_keys=True),
            "params_hash": c.params_hash,
            "input_names": [r.name for r in c.inputs],
            "input_uris": [r.uri for r in c.inputs],
            "input_fingerprints": [r.fingerprint for r in c.inputs],
            "update_sparsity_bf16": sparsity.get(c.candidate_id),
            "mergeaudit_version": mergeaudit.__version__,
            "status": "failed" if c.candidate_id in failures else "ok",
            "error": failures.get(c.candidate_id),
            **_probe_columns(c.probe),
        }
        for c in candidates
    ]


def _probe_columns(probe: dict[str, Any] | None) -> dict[str, Any]:
    if not probe:
        return {}
    return {
        "probe_family": probe["family"],
        "probe_path": probe["path"],
        "probe_x": float(probe["x"]),
        "probe_seed": probe.get("seed"),
    }


def checkpoint_rows(config: AuditConfig, records: dict[str, CheckpointRecord]) -> list[dict]:
    def role(name: str, r: CheckpointRecord) -> str:
        return "base" if name == config.base.name else "series_step" if r.series else "model"

    return [
        {
            "name": r.name,
            "role": role(name, r),
            "kind": r.kind,
            "uri": r.uri,
            "fingerprint": r.fingerprint,
            "n_tensors": r.n_tensors,
            "nbytes": r.nbytes,
            "model_type": r.model_type,
            "dtype": r.dtype,
        }
        for name, r in records.items()
    ]


def result_rows(
    config: AuditConfig,
    checkpoints: dict[str, CheckpointRecord],
    geometry_tables: dict[str, list[dict]],
    candidates: list[Candidate],
    results: list[CandidateResult],
    failures: dict[str, str] | None = None,
) -> dict[str, list[dict]]:
    """Every table's rows of one run but `runs`; scores and samples carry their candidate's
    name, method and parameter hash."""
    scores = [row for r in results for row in r.scores]
    samples = [row for r in results for row in r.samples]
    cands = candidate_rows(candidates, results, failures)
    run = RunResults(
        config.results_uri,
        "",
        {
            "candidates": cands,
            "scores": scores,
            "samples": samples,
            "checkpoints": checkpoint_rows(config, checkpoints),
        },
    )
    probe_candidates, probe_scores = fragility.summarize(run)
    cands += [{**row, "mergeaudit_version": mergeaudit.__version__, "status": "ok"} for row in probe_candidates]
    by_id = {c["candidate_id"]: c for c in cands}

    def tag(row: dict, full: bool = True) -> dict:
        c = by_id.get(row["candidate_id"], {})
        extra = {"candidate": c.get("name")}
        if full:
            extra.update(method=c.get("method"), params_hash=c.get("params_hash"))
        return {**row, **extra}

    return {
        **geometry_tables,
        "checkpoints": checkpoint_rows(config, checkpoints),
        "candidates": cands,
        "scores": [tag(r) for r in scores + probe_scores],
        "samples": [tag(row, full=False) for row in samples],
    }


def run_row(
    audit_name: str, started_at: dt.datetime, config_json: str, status: str = "completed", **extra: Any
) -> dict:
    """The `runs` row: what ran, when, with which configuration and package versions."""
    return {
        **extra,
        "audit_name": audit_name,
        "started_at": started_at,
        "finished_at": dt.datetime.now(dt.timezone.utc),
        "status": status,
        "config_json": config_json,
        "mergeaudit_version": mergeaudit.__version__,
        "package_versions": json.dumps(package_versions(), sort_keys=True),
    }
