"""The regression alarm: compare a run with the previous committed run of the same audit.

Candidates are matched by name (`ties(rl_math+rl_code; density=0.3)`), not by id: ids change
whenever a checkpoint changes, which is what nightly runs are for. A score is flagged when it
dropped by more than `max_drop` (absolute) *and* by more than `z` standard errors of the
difference (sqrt(se_prev^2 + se_now^2); without standard errors only the absolute test
applies), on each task's primary metric (or every metric, `metrics: all`). A candidate that
scored before and failed now is flagged too.

    report = check_run(results_uri, run_id, AlarmSpec(max_drop=0.02, z=2.0))
    if report.regressions: ...
"""

from __future__ import annotations

import math
from typing import Literal

import pyarrow as pa
import pydantic

from mergeaudit import probes, tables
from mergeaudit.config import AlarmSpec
from mergeaudit.errors import ConfigError

__all__ = ["AlarmSpec", "Regression", "RegressionReport", "check_run", "compare"]


class Regression(pydantic.BaseModel):
    kind: Literal["score_drop", "newly_failed"]
    candidate: str
    task: str | None = None
    metric: str | None = None
    previous: float | None = None
    current: float | None = None
    drop: float | None = None
    z: float | None = None
    error: str | None = None

    def line(self) -> str:
        if self.kind == "newly_failed":
            return f"{self.candidate}: failed now ({self.error or 'no scores'}), scored before"
        zs = f", {self.z:.1f} se" if self.z is not None and math.isfinite(self.z) else ""
        return (f"{self.candidate} {self.task}/{self.metric}: {self.previous:.4f} -> {self.current:.4f} "
                f"(-{self.drop:.4f}{zs})")


class RegressionReport(pydantic.BaseModel):
    audit_name: str | None
    run_id: str
    previous_run_id: str | None
    regressions: list[Regression]
    compared: int

    def summary(self) -> str:
        if self.previous_run_id is None:
            return f"run {self.run_id}: no earlier committed run of this audit to compare with"
        if not self.regressions:
            return f"run {self.run_id}: no regressions against {self.previous_run_id} ({self.compared} scores compared)"
        head = f"run {self.run_id}: {len(self.regressions)} regression(s) against {self.previous_run_id}"
        return head + "\n" + "\n".join("- " + r.line() for r in self.regressions)


LOWER_IS_BETTER = ("verifier_errors",)


def _scores_by_name(scores: pa.Table, candidates: pa.Table, metrics: str) -> dict[tuple[str, str, str], tuple]:
    names = dict(zip(candidates.column("candidate_id").to_pylist(), candidates.column("name").to_pylist()))
    kinds = dict(zip(candidates.column("candidate_id").to_pylist(), candidates.column("kind").to_pylist()))
    rows = [r for r in scores.to_pylist() if r["filter"] != "probe" and kinds.get(r["candidate_id"]) != "probe"
            and r["metric"] not in LOWER_IS_BETTER and r["value"] is not None]
    keep = None
    if metrics == "primary":
        keep = {(t, probes.primary_metric([r for r in rows if r["task"] == t], t)) for t in {r["task"] for r in rows}}
    return {(names.get(r["candidate_id"], r["candidate_id"]), r["task"], r["metric"]): (r["value"], r["stderr"])
            for r in rows if keep is None or (r["task"], r["metric"]) in keep}


def _status(candidates: pa.Table) -> dict[str, tuple[str, str | None]]:
    rows = candidates.to_pylist()
    return {r["name"]: (r["status"] or "ok", r["error"]) for r in rows if r["kind"] != "probe"}


def compare(current: dict[str, pa.Table], previous: dict[str, pa.Table], spec: AlarmSpec) -> tuple[list[Regression], int]:
    """Regressions of `current` against `previous`, each a dict with `candidates` and `scores`."""
    now = _scores_by_name(current["scores"], current["candidates"], spec.metrics)
    before = _scores_by_name(previous["scores"], previous["candidates"], spec.metrics)
    out: list[Regression] = []
    compared = 0
    for key in sorted(now.keys() & before.keys()):
        (v_now, se_now), (v_before, se_before) = now[key], before[key]
        compared += 1
        drop = v_before - v_now
        ses = [s for s in (se_now, se_before) if s is not None and math.isfinite(s)]
        se = math.sqrt(sum(s * s for s in ses)) if ses else None
        z = drop / se if se else (math.inf if se == 0.0 and drop > 0 else None)
        if drop > spec.max_drop and (se is None or z is None or z > spec.z):
            out.append(Regression(kind="score_drop", candidate=key[0], task=key[1], metric=key[2], previous=v_before,
                                  current=v_now, drop=drop, z=z if z is None or math.isfinite(z) else None))
    status_now, status_before = _status(current["candidates"]), _status(previous["candidates"])
    scored_before = {name for name, _, _ in before}
    for name, (status, error) in sorted(status_now.items()):
        if status == "failed" and status_before.get(name, ("missing", None))[0] == "ok" and name in scored_before:
            out.append(Regression(kind="newly_failed", candidate=name, error=error))
    return out, compared


def check_run(results_uri: str, run_id: str | None = None, spec: AlarmSpec | None = None) -> RegressionReport:
    """Compare a committed run (default: the latest) with the previous committed run of its audit."""
    spec = spec or AlarmSpec()
    runs = tables.committed_runs(results_uri)
    if not runs:
        raise ConfigError(f"no committed runs under {results_uri}")
    if run_id is None:
        run_id = runs[-1]["run_id"]
    names = {m["run_id"]: tables.manifest_audit_name(results_uri, m) for m in runs}
    if run_id not in names:
        raise ConfigError(f"run {run_id!r} is not committed under {results_uri}")
    audit = names[run_id]
    same = [m["run_id"] for m in runs if names[m["run_id"]] == audit]
    earlier = same[:same.index(run_id)]
    if not earlier:
        return RegressionReport(audit_name=audit, run_id=run_id, previous_run_id=None, regressions=[], compared=0)
    previous_id = earlier[-1]

    def load(rid: str) -> dict[str, pa.Table]:
        return {t: tables.read_table(results_uri, t, run_id=rid, manifests=runs) for t in ("candidates", "scores")}

    found, compared = compare(load(run_id), load(previous_id), spec)
    return RegressionReport(audit_name=audit, run_id=run_id, previous_run_id=previous_id, regressions=found,
                            compared=compared)

