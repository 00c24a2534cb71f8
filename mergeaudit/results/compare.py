"""The regression alarm: a run against the previous committed run of the same audit.

Candidates are matched by name (`ties(rl_math+rl_code; density=0.3)`), not by id: ids change
whenever a checkpoint changes, which is what nightly runs are for. Each score (each task's
primary metric, or every higher-is-better metric with `metrics: all`) is compared on the
prompts both runs share (mergeaudit.results.stats states the formulas):

- one 0/1 sample per prompt: McNemar's exact test on the prompts that changed;
- otherwise, per-prompt values in both runs: the paired t-test on per-prompt means;
- no shared prompts, or no per-prompt rows (lm-eval's own metrics): Welch's z from the two
  values and standard errors (without standard errors only the absolute threshold applies).

A score is flagged when it dropped by more than `alarm.max_drop` (absolute) and its one-sided
p-value is at most `alarm.significance`. A candidate that scored before and failed now is
flagged too. Every comparison says its test, the prompts that got better and worse, and p.

    check = check_run(RESULTS, run_id, AlarmSettings(max_drop=0.02, significance=0.05))
    if check.regressions: ...
"""

from __future__ import annotations

from typing import Literal

import pydantic

from mergeaudit import tables
from mergeaudit.errors import ConfigError
from mergeaudit.results.alarm import AlarmSettings
from mergeaudit.results.scores import RunResults, committed, is_diagnostic, load_run
from mergeaudit.results.stats import PairedTest, TestName, paired_test, welch_z

__all__ = ["AlarmSettings", "Regression", "RegressionReport", "check_run", "compare", "previous_run_id"]


class Regression(pydantic.BaseModel):
    """One compared score (kind score_drop, flagged or not) or a newly failed candidate."""

    kind: Literal["score_drop", "newly_failed"]
    candidate: str
    task: str | None = None
    metric: str | None = None
    previous: float | None = None
    current: float | None = None
    drop: float | None = None
    test: TestName | None = None
    n_shared: int | None = None
    n_better: int | None = None
    n_worse: int | None = None
    p_value: float | None = None
    flagged: bool = True
    error: str | None = None

    def evidence(self) -> str:
        if self.test in ("mcnemar", "paired_t"):
            head = f"{self.test} on {self.n_shared} shared prompts: {self.n_better} better, {self.n_worse} worse"
        else:
            head = self.test or "no test"
        return head + (f", p={self.p_value:.2g}" if self.p_value is not None else ", no p-value")

    def line(self) -> str:
        if self.kind == "newly_failed":
            return f"{self.candidate}: failed now ({self.error or 'no scores'}), scored before"
        return (
            f"{self.candidate} {self.task}/{self.metric}: {self.previous:.4f} -> {self.current:.4f} "
            f"({-self.drop:+.4f}; {self.evidence()})"
        )


class RegressionReport(pydantic.BaseModel):
    audit_name: str | None
    run_id: str
    previous_run_id: str | None
    regressions: list[Regression]
    compared: int
    comparisons: list[Regression] = []  # every compared score, flagged or not
    max_drop: float | None = None
    significance: float | None = None

    def summary(self) -> str:
        if self.previous_run_id is None:
            return f"run {self.run_id}: no earlier committed run of this audit to compare with"
        rule = (
            f" (flagged: drop > {self.max_drop:g} and one-sided p <= {self.significance:g})"
            if self.max_drop is not None and self.significance is not None
            else ""
        )
        if not self.regressions:
            return (
                f"run {self.run_id}: no regressions against {self.previous_run_id} "
                f"({self.compared} scores compared{rule and ';' + rule[1:-1]})"
            )
        head = f"run {self.run_id}: {len(self.regressions)} regression(s) against {self.previous_run_id}{rule}"
        return head + "\n" + "\n".join("- " + r.line() for r in self.regressions)

    def event_payload(self) -> dict:
        """What the `mergeaudit.regression` event carries: the flagged scores with their tests."""
        return self.model_dump(exclude={"comparisons"})


def _keyed_scores(run: RunResults, metrics: str) -> dict[tuple[str, str, str], dict]:
    names = {c["candidate_id"]: c["name"] for c in run.table("candidates")}
    rows = [r for r in run.candidate_scores() if not is_diagnostic(r["metric"])]
    if metrics == "primary":
        keep = {(t, run.primary_metric(t)) for t in {r["task"] for r in rows}}
        rows = [r for r in rows if (r["task"], r["metric"]) in keep]
    return {(names.get(r["candidate_id"], r["candidate_id"]), r["task"], r["metric"]): r for r in rows}


def _status(run: RunResults) -> dict[str, tuple[str, str | None]]:
    # rows about to be committed carry only the columns they set (probe summaries set no error)
    return {r["name"]: (r.get("status") or "ok", r.get("error")) for r in run.candidates() if r["kind"] != "probe"}


def compare_score(previous: RunResults, before: dict, current: RunResults, now: dict) -> PairedTest:
    """The test of one score: paired on shared prompts where both runs have per-prompt rows."""
    metric, task = now["metric"], now["task"]
    prev_pp = previous.per_prompt(before["candidate_id"], task, metric)
    cur_pp = current.per_prompt(now["candidate_id"], task, metric)
    if prev_pp and cur_pp:
        test = paired_test(prev_pp, cur_pp)
        if test.test != "none":
            return test
    stat, p = welch_z(before["value"], before["stderr"], now["value"], now["stderr"])
    return PairedTest(test="welch_z" if p is not None else "none", statistic=stat, p_value=p)


def compare(
    current: RunResults, previous: RunResults, spec: AlarmSettings
) -> tuple[list[Regression], list[Regression]]:
    """(flagged, every comparison) of `current` against `previous`."""
    now, before = _keyed_scores(current, spec.metrics), _keyed_scores(previous, spec.metrics)
    compared: list[Regression] = []
    for key in sorted(now.keys() & before.keys()):
        a, b = before[key], now[key]
        test = compare_score(previous, a, current, b)
        drop = a["value"] - b["value"]
        significant = test.p_value is None or test.p_value <= spec.significance
        compared.append(
            Regression(
                kind="score_drop",
                candidate=key[0],
                task=key[1],
                metric=key[2],
                previous=a["value"],
                current=b["value"],
                drop=drop,
                test=test.test,
                n_shared=test.n_shared,
                n_better=test.n_better,
                n_worse=test.n_worse,
                p_value=test.p_value,
                flagged=drop > spec.max_drop and significant,
            )
        )
    flagged = [c for c in compared if c.flagged]
    status_now, status_before = _status(current), _status(previous)
    scored_before = {name for name, _, _ in before}
    for name, (status, error) in sorted(status_now.items()):
        if status == "failed" and status_before.get(name, ("missing", None))[0] == "ok" and name in scored_before:
            flagged.append(Regression(kind="newly_failed", candidate=name, error=error))
    return flagged, compared


def previous_run_id(
    results_uri: str, run_id: str, audit_name: str | None, manifests: list[dict] | None = None
) -> str | None:
    """The latest committed run of the same audit before `run_id` (or before now, when
    `run_id` is not committed yet)."""
    runs = manifests if manifests is not None else tables.committed_runs(results_uri)
    same = [m["run_id"] for m in runs if tables.manifest_audit_name(results_uri, m) == audit_name]
    earlier = same[: same.index(run_id)] if run_id in same else same
    return earlier[-1] if earlier else None


def check(current: RunResults, spec: AlarmSettings, manifests: list[dict] | None = None) -> RegressionReport:
    """Compare a run's rows (committed or about to be) with the previous committed run."""
    prev_id = previous_run_id(current.results_uri, current.run_id, current.audit_name, manifests)
    flagged, compared = [], []
    if prev_id is not None:
        previous = load_run(current.results_uri, prev_id, ("runs", "candidates", "scores", "samples"), manifests)
        flagged, compared = compare(current, previous, spec)
    return RegressionReport(
        audit_name=current.audit_name,
        run_id=current.run_id,
        previous_run_id=prev_id,
        regressions=flagged,
        compared=len(compared),
        comparisons=compared,
        max_drop=spec.max_drop,
        significance=spec.significance,
    )


def check_run(results_uri: str, run_id: str | None = None, spec: AlarmSettings | None = None) -> RegressionReport:
    """Compare a committed run (default: the latest) with the previous committed run of its audit."""
    runs = committed(results_uri)
    run_id = run_id or runs[-1]["run_id"]
    if run_id not in {m["run_id"] for m in runs}:
        raise ConfigError(f"run {run_id!r} is not committed under {results_uri}")
    current = load_run(results_uri, run_id, ("runs", "candidates", "scores", "samples"), runs)
    if not current.run.get("audit_name"):
        manifest = next(m for m in runs if m["run_id"] == run_id)
        current.rows["runs"] = [{**current.run, "audit_name": tables.manifest_audit_name(results_uri, manifest)}]
    return check(current, spec or AlarmSettings(), runs)
