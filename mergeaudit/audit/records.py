"""The small records the audit's stages exchange, never tensors or models: a resolved
checkpoint, a candidate (a recipe), what evaluating one produced and where it is stored, and
what a finished run wrote."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid
from typing import Any, Literal

import pydantic

from mergeaudit.merging.executor import MergePlan
from mergeaudit.results import leaderboard
from mergeaudit.results.compare import RegressionReport


def digest(obj: Any) -> str:
    """sha256 of an object's canonical JSON (ids of recipes and evaluations)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def new_run_id(now: dt.datetime | None = None) -> str:
    """A sortable, path-safe run id: UTC timestamp plus 8 random hex digits."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


class CheckpointRecord(pydantic.BaseModel):
    """A resolved checkpoint: where it is, what it is, and the fingerprint of its files."""

    model_config = pydantic.ConfigDict(frozen=True)
    name: str
    uri: str
    kind: str
    fingerprint: str
    n_tensors: int
    nbytes: int
    model_type: str | None = None
    dtype: str | None = None
    series: str | None = None  # a step of this series (config.series), not a model of the audit
    step: int | None = None
    size: int | None = None  # bytes of all its files: what one full read (a cache fill) fetches


class Candidate(pydantic.BaseModel):
    """Something we score: a stored checkpoint, or a merge recipe (a MergePlan) of named
    checkpoints, materialised where it is evaluated."""

    model_config = pydantic.ConfigDict(frozen=True)
    candidate_id: str
    name: str
    kind: Literal["checkpoint", "merge", "probe"]
    inputs: list[CheckpointRecord]
    base: CheckpointRecord
    plan: MergePlan | None = None
    probe: dict[str, Any] | None = None

    @property
    def method(self) -> str | None:
        return self.plan.method if self.plan else None

    @property
    def params(self) -> dict[str, Any]:
        if self.plan is None:
            return {}
        out = {
            "parameters": self.plan.parameters,
            "model_parameters": self.plan.model_parameters,
            "seed": self.plan.seed,
            "out_dtype": self.plan.out_dtype,
        }
        return {**out, "probe": self.probe} if self.probe else out

    @property
    def params_hash(self) -> str:
        return digest(self.params)[:16]


class CandidateResult(pydantic.BaseModel):
    """What evaluating one candidate produced: score rows, per-sample verdicts, and the bf16
    sparsity of its update."""

    candidate_id: str
    scores: list[dict[str, Any]]
    samples: list[dict[str, Any]] = []
    update_sparsity_bf16: float | None


class EvaluationRecord(pydantic.BaseModel):
    """Where one candidate's evaluation (scores and samples) was stored: the small record
    tasks and child flow runs pass around instead of the rows themselves."""

    candidate_id: str
    uri: str | None
    scores: int
    samples: int
    update_sparsity_bf16: float | None
    status: Literal["ok", "failed"] = "ok"
    error: str | None = None
    bytes_read: dict[str, int] = {}  # by input URI: what the evaluation read from the stores
    read_by: str | None = None  # the process that read them (store.process_tag())


class RunOutcome(pydantic.BaseModel):
    """What a finished run wrote, and what to show about it."""

    run_id: str
    results_uri: str
    tables: dict[str, str]
    summary: list[leaderboard.SummaryRow]
    failed: list[str] = []
    regressions: RegressionReport | None = None
    notes: list[str] = []  # what the summary must state besides scores (tensors geometry did not compare)
    bytes_read: dict[str, int] = {}  # by input name: read from its store by this run, in every process
    input_sizes: dict[str, int] = {}  # by input name: bytes of all its files

    def problems(self) -> str | None:
        """One paragraph on what went wrong (failed candidates, regressions), or None."""
        lines = [f"{len(self.failed)} candidate(s) failed: {', '.join(self.failed)}"] if self.failed else []
        if self.regressions and self.regressions.regressions:
            lines.append(self.regressions.summary())
        return "\n".join(lines) or None
