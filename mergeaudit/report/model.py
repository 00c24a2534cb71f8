"""What a report is made of: a run's results with their context, figures and sections."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

from mergeaudit.results.compare import RegressionReport
from mergeaudit.results.scores import RunResults
from mergeaudit.results.scores import load_run as load_results


@dataclass
class RunData(RunResults):
    """A run's results plus what the report shows around them."""

    regression: RegressionReport | None = None  # the check against the previous run, when made
    notes: str | None = None  # free text shown first (the demo's verdict)
    own_tasks: dict[str, str] | None = None  # expert -> own task, for MergeBench's measures


@dataclass
class Figure:
    id: str
    title: str
    png: bytes
    caption: str = ""

    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode()


@dataclass
class Content:
    figures: list[Figure] = field(default_factory=list)
    sections: list[tuple[str, list[dict], list[str]]] = field(default_factory=list)  # title, rows, columns


def load_run(results_uri: str, run_id: str | None = None) -> RunData:
    run = load_results(results_uri, run_id)
    return RunData(run.results_uri, run.run_id, run.rows)
