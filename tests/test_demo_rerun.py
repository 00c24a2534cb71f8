"""A second `mergeaudit demo` in the same folder: its audit compares with the first run."""

from __future__ import annotations

from mergeaudit.results.alarm import AlarmSettings
from mergeaudit.results.compare import compare
from mergeaudit.results.scores import RunResults


def test_the_alarm_compares_rows_that_set_no_error_column():
    """A second demo in the same folder compares its rows (probe summaries carry no `error`
    key before they are committed) with the first run's: this raised KeyError."""
    now = RunResults(
        "mem://r",
        "r2",
        {
            "candidates": [
                {"candidate_id": "p", "name": "interpolation(a~b)", "kind": "probe_summary", "status": "ok"},
                {"candidate_id": "m", "name": "ties(a+b)", "kind": "merge", "status": "failed", "error": "boom"},
            ]
        },
    )
    before = RunResults(
        "mem://r",
        "r1",
        {
            "candidates": [
                {
                    "candidate_id": "p0",
                    "name": "interpolation(a~b)",
                    "kind": "probe_summary",
                    "status": "ok",
                    "error": None,
                },
                {"candidate_id": "m0", "name": "ties(a+b)", "kind": "merge", "status": "ok", "error": None},
            ],
            "scores": [{"candidate_id": "m0", "task": "t", "metric": "numeric_match", "value": 0.5, "stderr": 0.05}],
        },
    )
    flagged, _ = compare(now, before, AlarmSettings())
    assert [(r.kind, r.candidate, r.error) for r in flagged] == [("newly_failed", "ties(a+b)", "boom")]
