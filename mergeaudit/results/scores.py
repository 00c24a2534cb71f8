"""A run's committed rows, typed score rows, each task's primary metric, and per-prompt values.

`RunResults` holds the rows of one run (from its committed tables, or from the rows a run is
about to commit); `primary_metric` names the metric that ranks candidates on a task (its
verifier's reward, else exact match); `per_prompt` rebuilds, from the `samples` table, the
per-prompt values a sample-averaged score is the mean of (the unit of its standard error and
of the paired comparisons):

    reward metric (numeric_match, math_verify, code_pass) and avg@n: the rewards of the prompt's samples
    pass@k: [pass_at_k(n, c, k)] of the prompt (n samples, c correct)
    format_rate: the prompt's 0/1 format verdicts

Prompts are keyed by (task, prompt_hash), or (task, doc_id) where no hash was logged.

    run = load_run(RESULTS)                           # latest committed run
    metric = run.primary_metric("mergeaudit_add2")
    values = run.per_prompt(candidate_id, "mergeaudit_add2", metric)
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import pydantic

from mergeaudit import tables
from mergeaudit.errors import ConfigError
from mergeaudit.results.stats import pass_at_k

VERIFIER_METRICS = ("numeric_match", "math_verify", "code_pass")
# Counts and lengths that describe a run but do not rank it (higher is not better): never a
# task's primary metric, never compared by the alarm.
DIAGNOSTIC_METRICS = (
    "verifier_errors",
    "verifier_timeouts",
    "code_violations",
    "truncation_rate",
    "completion_tokens",
    "trace_tokens",
)


def is_diagnostic(metric: str) -> bool:
    return metric in DIAGNOSTIC_METRICS or metric.startswith("outcome_")


RUN_TABLES = (
    "runs",
    "checkpoints",
    "geometry_tensors",
    "geometry_pairs",
    "geometry_series",
    "candidates",
    "scores",
    "samples",
)


class ScoreRow(pydantic.BaseModel):
    """One row of the `scores` table. Sample-averaged scores: `value` is the mean over prompts
    of the per-prompt mean, `stderr` the standard deviation of the per-prompt means over
    sqrt(n), `n` the number of prompts. Probe summaries carry their setting in probe_family /
    probe_x and, for barrier heights, a bootstrap interval in ci_low / ci_high."""

    model_config = pydantic.ConfigDict(extra="ignore")
    candidate_id: str
    candidate: str | None = None
    task: str
    metric: str
    filter: str | None = None
    value: float | None
    stderr: float | None = None
    n: int | None = None
    probe_family: str | None = None
    probe_x: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None


def primary_metric(metrics: set[str] | list[str]) -> str | None:
    """The metric that ranks candidates on a task: its verifier's reward, else exact match,
    else the first name in sort order."""
    names = set(metrics)
    for name in (*VERIFIER_METRICS, "exact_match"):
        if name in names:
            return name
    return min(names) if names else None


def is_probe_summary(row: dict) -> bool:
    return row.get("filter") == "probe" or row.get("probe_family") is not None


@dataclass
class RunResults:
    """The rows of one run, table by table, as dicts (missing tables are empty)."""

    results_uri: str
    run_id: str
    rows: dict[str, list[dict]]
    _samples: dict | None = field(default=None, repr=False)

    def table(self, name: str) -> list[dict]:
        return self.rows.get(name) or []

    @property
    def run(self) -> dict:
        return (self.table("runs") or [{}])[0]

    @property
    def audit_name(self) -> str | None:
        return self.run.get("audit_name")

    def candidates(self, *kinds: str) -> list[dict]:
        return [c for c in self.table("candidates") if not kinds or c["kind"] in kinds]

    def scores(self) -> list[ScoreRow]:
        return [ScoreRow.model_validate(s) for s in self.table("scores")]

    def candidate_scores(self) -> list[dict]:
        """Score rows of checkpoints and merges (not probe points or probe summaries)."""
        kinds = {c["candidate_id"]: c["kind"] for c in self.table("candidates")}
        return [
            s
            for s in self.table("scores")
            if not is_probe_summary(s)
            and kinds.get(s["candidate_id"]) not in ("probe", "probe_summary")
            and s["value"] is not None
        ]

    def tasks(self) -> list[str]:
        return sorted({s["task"] for s in self.table("scores") if not is_probe_summary(s)})

    def primary_metric(self, task: str) -> str | None:
        return primary_metric(
            {
                s["metric"]
                for s in self.table("scores")
                if s["task"] == task and not is_probe_summary(s) and not is_diagnostic(s["metric"])
            }
        )

    def primary_scores(self, task: str, kinds: tuple[str, ...] | None = None) -> dict[str, dict]:
        """candidate_id -> score row of the task's primary metric (every non-summary candidate,
        probe points included, unless `kinds` narrows them)."""
        metric = self.primary_metric(task)
        kind = {c["candidate_id"]: c["kind"] for c in self.table("candidates")}
        return {
            s["candidate_id"]: s
            for s in self.table("scores")
            if s["task"] == task
            and s["metric"] == metric
            and not is_probe_summary(s)
            and (kinds is None or kind.get(s["candidate_id"]) in kinds)
        }

    def per_prompt(self, candidate_id: str, task: str, metric: str) -> dict[str, list[float]] | None:
        """prompt key -> the values the score is the mean of; None when the metric has no
        per-sample rows (lm-eval's own metrics)."""
        if self._samples is None:
            index: dict[tuple[str, str], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
            for s in self.table("samples"):
                key = s.get("prompt_hash") or f"doc{s['doc_id']}"
                index[(s["candidate_id"], s["task"])][key].append(s)
            self._samples = index
        by_prompt = self._samples.get((candidate_id, task))
        if not by_prompt:
            return None
        if metric in VERIFIER_METRICS or metric.startswith("avg@"):  # avg@n is the mean reward
            return {k: [float(s["reward"] or 0.0) for s in rows] for k, rows in by_prompt.items()}
        if metric.startswith("pass@"):
            k = int(metric[5:])
            return {
                p: [pass_at_k(len(rows), sum(bool(s["verdict"]) for s in rows), k)]
                for p, rows in by_prompt.items()
                if len(rows) >= k
            }
        if metric == "format_rate":
            out = {
                p: [1.0 if s["format_ok"] else 0.0 for s in rows if s["format_ok"] is not None]
                for p, rows in by_prompt.items()
            }
            return {p: v for p, v in out.items() if v}
        return None


def params(row: dict) -> dict[str, Any]:
    try:
        return json.loads(row.get("params_json") or "{}")
    except json.JSONDecodeError:
        return {}


def committed(results_uri: str) -> list[dict]:
    runs = tables.committed_runs(results_uri)
    if not runs:
        raise ConfigError(f"no committed runs under {results_uri}")
    return runs


def load_run(
    results_uri: str,
    run_id: str | None = None,
    names: tuple[str, ...] = RUN_TABLES,
    manifests: list[dict] | None = None,
) -> RunResults:
    """The committed rows of a run (default: the latest committed run)."""
    runs = manifests if manifests is not None else committed(results_uri)
    run_id = run_id or runs[-1]["run_id"]
    if run_id not in {m["run_id"] for m in runs}:
        raise ConfigError(f"run {run_id!r} is not committed under {results_uri}")
    rows = {t: tables.read_table(results_uri, t, run_id=run_id, manifests=runs).to_pylist() for t in names}
    return RunResults(results_uri, run_id, rows)
