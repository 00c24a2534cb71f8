"""A training run as a series of checkpoints: when its updates turn dense, leave the base's
spectrum or start to collide with another run's.

Given a base, the checkpoints one run saved at steps s_1 < ... < s_n (s_n is the run's final
update) and, optionally, other runs' checkpoints, `compute_series` returns the rows of
`geometry_series`: one per step, scope (`model`, or `module` per module type, as in
geometry_tensors) and `against`:

- `base`: the step's update against the base, with the definitions of geometry_tensors:
  `sparsity_bf16` / `_rel` / `_abs` (unweighted means over tensors, Mukherjee et al.),
  `changed_bf16`, `rel_update_norm`, `update_rank_ratio` and `spectral_drift` (means over 2-D
  tensors), `principal_lift` (Zhu et al.);
- `previous`: the update since the previous saved step, that step taken as the base
  (`sparsity_bf16`, `changed_bf16`, `rel_update_norm`); none for the first step;
- `final`: the step's update mask against the final step's (bf16 masks, as geometry_pairs):
  `overlap_of_step` (share of the step's changed entries the final update also changed),
  `overlap_of_other` (share of the final update's entries already changed at this step),
  `jaccard`, their lifts over chance, `sign_conflict_rate`, `cosine`; none for the last step;
- `model`: the same against another run's checkpoint (`against_model` names it): how much the
  run's update collides with the other's, step by step.

Cost: one streaming pass over the base, every step and the other runs (memory: one tensor per
checkpoint, as compute_geometry), with the spectral figures of every step; then one pass per
consecutive pair of steps without spectral figures (the masks run at about read speed).
Pairs are measured only between each step and the final step or another run, not between all
steps.

    rows = compute_series(base, "math-run", [(100, ck100), (200, ck200), (300, ck300)],
                          others={"code": code_ck}, kind="rlvr")
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Literal

import pydantic

from mergeaudit import store
from mergeaudit.checkpoint import Checkpoint, discover
from mergeaudit.errors import CheckpointError
from mergeaudit.fields import Name, StoreURI
from mergeaudit.frozen import Frozen
from mergeaudit.geometry import GeometrySettings, compute_geometry

__all__ = ["SeriesSpec", "SeriesStep", "compute_series", "discover_steps", "spaced", "step_label", "step_number"]
log = logging.getLogger(__name__)

_STEP_RE = re.compile(r"(\d+)(?!.*\d)")
_BASE_COLUMNS = (
    "numel",
    "n_tensors",
    "changed_bf16",
    "sparsity_bf16",
    "sparsity_rel",
    "sparsity_abs",
    "rel_update_norm",
    "update_rank_ratio",
    "spectral_drift",
    "principal_lift",
)
_PAIR_COLUMNS = {
    "numel": "numel",
    "overlap": "overlap",
    "overlap_of_a": "overlap_of_step",
    "overlap_of_a_lift": "overlap_of_step_lift",
    "overlap_of_b": "overlap_of_other",
    "jaccard": "jaccard",
    "jaccard_lift": "jaccard_lift",
    "sign_conflict_rate": "sign_conflict_rate",
    "cosine": "cosine",
}


class SeriesStep(Frozen):
    step: int = pydantic.Field(ge=0, description="Training step the checkpoint was saved at.")
    uri: StoreURI = pydantic.Field(description="Folder of the checkpoint.")


class SeriesSpec(Frozen):
    """Checkpoints one training run saved, by step: geometry as a function of the step
    (`geometry_series`, mergeaudit.geometry.series). Give the steps, or a prefix under which
    every complete checkpoint folder with a number in its path (`step-100`, `checkpoint-200`)
    is a step, found as the watcher finds new checkpoints."""

    name: Name = pydantic.Field(description="Name of the run; its steps are `name@step` in tables.")
    kind: Literal["rlvr", "sft", "unknown"] = pydantic.Field("unknown", description="How the run trains.")
    steps: list[SeriesStep] | None = pydantic.Field(None, description="The checkpoints by step.")
    prefix: StoreURI | None = pydantic.Field(None, description="...or where the run saves them (path or s3://).")
    compare_with: list[str] | None = pydantic.Field(
        None, description="Models of the audit whose updates each step is compared with (default: all)."
    )
    max_steps: int = pydantic.Field(
        16, ge=2, le=256, description="Most steps measured: evenly spaced, first and last kept."
    )

    @pydantic.model_validator(mode="after")
    def _one_source(self) -> SeriesSpec:
        if (self.steps is None) == (self.prefix is None):
            raise ValueError(f"series {self.name}: give `steps` or `prefix`, not both or neither")
        numbers = [s.step for s in self.steps or []]
        if len(set(numbers)) != len(numbers):
            raise ValueError(f"series {self.name}: a step number appears twice")
        if self.steps is not None and not self.steps:
            raise ValueError(f"series {self.name}: `steps` is empty")
        return self

    def uris(self) -> list[str]:
        return [self.prefix] if self.prefix else [s.uri for s in self.steps or []]

    def found_steps(self, marker: str | None) -> list[tuple[int, str]]:
        """The (step, uri) pairs measured: as listed, or the complete checkpoints under the
        prefix now; at most `max_steps`, evenly spaced (first and last kept)."""
        if self.steps is not None:
            found = sorted((s.step, s.uri) for s in self.steps)
        else:
            found, skipped = discover_steps(self.prefix, marker)
            for line in skipped:
                log.warning("series %s: left out %s", self.name, line)
            if not found:
                raise CheckpointError(
                    f"series {self.name}: no complete checkpoint with a step number under {self.prefix}"
                )
        return spaced(found, self.max_steps)


def step_label(run: str, step: int) -> str:
    """The name a step goes by in tables: `run@step`."""
    return f"{run}@{step}"


def step_number(relative: str) -> int | None:
    """The step of a checkpoint folder from its path under the run's prefix: its last number
    (`step-100`, `checkpoint-200`, `global_step300/actor` -> 100, 200, 300); None without one."""
    m = _STEP_RE.search(relative)
    return int(m.group(1)) if m else None


def discover_steps(prefix: str, marker: str | None = None) -> tuple[list[tuple[int, str]], list[str]]:
    """The complete checkpoints under a run's prefix by step (as the watcher finds them), and
    one line per folder left out (incomplete, no step number, or a step seen twice)."""
    found: dict[int, str] = {}
    skipped: list[str] = []
    root = store.check_uri(prefix).rstrip("/")
    for status in discover(root, marker):
        rel = status.uri[len(root) + 1 :] if status.uri.startswith(root + "/") else store.basename(status.uri)
        step = step_number(rel)
        if not status.complete:
            skipped.append(f"{status.uri}: {status.problem}")
        elif step is None:
            skipped.append(f"{status.uri}: no step number in its path")
        elif step in found:
            skipped.append(f"{status.uri}: step {step} also at {found[step]}")
        else:
            found[step] = status.uri
    return sorted(found.items()), skipped


def spaced(steps: Sequence[tuple[int, str]], most: int) -> list[tuple[int, str]]:
    """At most `most` of the sorted steps, evenly spaced, first and last always kept."""
    if len(steps) <= most:
        return list(steps)
    n = len(steps) - 1
    return [steps[round(i * n / (most - 1))] for i in range(most)]


def compute_series(
    base: Checkpoint,
    run: str,
    steps: Sequence[tuple[int, Checkpoint]],
    others: Mapping[str, Checkpoint] | None = None,
    kind: str = "unknown",
    settings: GeometrySettings = GeometrySettings(),
    decompositions: dict | None = None,
) -> list[dict]:
    """Rows of geometry_series for one run's steps (see the module docstring); `decompositions`
    shares the base's decompositions with other calls (see compute_geometry)."""
    steps = sorted(steps, key=lambda s: s[0])
    if len({s for s, _ in steps}) != len(steps):
        raise ValueError(f"series {run}: a step number appears twice")
    others = dict(others or {})
    labels = {step_label(run, s): (s, ck) for s, ck in steps}
    order = list(labels)
    final = order[-1]
    models = {**{label: ck for label, (_, ck) in labels.items()}, **others}
    pairs = [(label, final) for label in order[:-1]] + [(label, o) for label in order for o in others]
    single = settings.model_copy(update={"elected_sign": False})
    tensor_rows, pair_rows = compute_geometry(base, models, settings=single, pairs=pairs, decompositions=decompositions)

    def row(label: str, scope: str, module: str | None, against: str, **values) -> dict:
        step, ck = labels[label]
        return {
            "series": run,
            "kind": kind,
            "step": step,
            "model_uri": ck.uri,
            "model_fingerprint": ck.fingerprint,
            "base_uri": base.uri,
            "base_fingerprint": base.fingerprint,
            "scope": scope,
            "module": module,
            "against": against,
            **values,
        }

    skipped: dict[str, int] = {}
    for r in tensor_rows:
        if r["scope"] == "tensor" and r["reason"] and r["model"] in labels:
            skipped[r["model"]] = skipped.get(r["model"], 0) + 1
    out = [
        row(
            r["model"],
            r["scope"],
            r["module"],
            "base",
            skipped_tensors=skipped.get(r["model"], 0),
            **{c: r.get(c) for c in _BASE_COLUMNS},
        )
        for r in tensor_rows
        if r["model"] in labels and r["scope"] in ("model", "module")
    ]
    for r in pair_rows:
        if r["scope"] not in ("global", "module"):
            continue
        other = r["model_b"]
        against = ("final", None, None) if other == final else ("model", other, models[other].fingerprint)
        out.append(
            row(
                r["model_a"],
                "model" if r["scope"] == "global" else "module",
                r["module"],
                against[0],
                against_model=against[1],
                against_fingerprint=against[2],
                **{new: r.get(old) for old, new in _PAIR_COLUMNS.items()},
            )
        )
    quick = single.model_copy(update={"spectral": False})
    for prev, cur in zip(order, order[1:]):
        step_rows, _ = compute_geometry(models[prev], {cur: models[cur]}, settings=quick)
        out += [
            row(
                cur,
                r["scope"],
                r["module"],
                "previous",
                against_model=prev,
                against_fingerprint=models[prev].fingerprint,
                **{c: r.get(c) for c in ("numel", "n_tensors", "changed_bf16", "sparsity_bf16", "rel_update_norm")},
            )
            for r in step_rows
            if r["scope"] in ("model", "module")
        ]
    scope_order = {"model": 0, "module": 1}
    against_order = {"base": 0, "previous": 1, "final": 2, "model": 3}
    out.sort(
        key=lambda r: (
            r["step"],
            scope_order[r["scope"]],
            r["module"] or "",
            against_order[r["against"]],
            r.get("against_model") or "",
        )
    )
    return out
