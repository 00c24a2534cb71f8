"""Uncertainty of the comparisons the demo (and anyone reading a run) draws, from the run's rows.

- `paired_difference(run, a, b, task)`: the mean over the prompts both candidates were scored on
  of a's per-prompt value minus b's (gain over the base, forgetting), with its standard error:
  the prompt is the unit (`stats.mean_stderr` of the per-prompt differences), so a gain that two
  candidates share on the same prompts is not counted as noise. Falls back to the difference of
  the two scores with sqrt(se_a^2 + se_b^2) when the run has no per-prompt rows.
- `lift_interval(...)`: a percentile bootstrap over tensors (`stats.bootstrap_ci`, tensors as the
  unit, resampled by name so the models of a pair stay paired) of an overlap lift over chance,
  recomputed from the tensor-scope rows of `geometry_pairs` (Jaccard of the bf16 update masks) or
  `geometry_tensors` (overlap with the base's principal weights, Zhu et al.). Tensors differ in
  size and role, so the interval says how much the figure rests on a few tensors, not how it
  would vary over retrainings; `None` when there are fewer than two tensors or no changed entry.
- `gain_kept_interval(...)`: the same bootstrap over prompts of MergeBench's gain kept (the share
  of the experts' gains over the base that a merge keeps), merge, experts and base paired.

    gain = paired_difference(run, "rl_add", "base", "mergeaudit_add2")   # .value, .stderr, .n, .paired
    lo, hi = jaccard_lift_interval(run, "rl_add", "rl_sub")
    lo, hi = principal_lift_interval(run, ["rl_add", "rl_sub"])
    lo, hi = gain_kept_interval(run, "ties(rl_add+rl_sub)", {"rl_add": ADD, "rl_sub": SUB}, "base")
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

from mergeaudit.results.scores import RunResults
from mergeaudit.results.stats import bootstrap_ci, mean_stderr

__all__ = ["Difference", "gain_kept_interval", "jaccard_lift_interval", "paired_difference", "principal_lift_interval"]


def _candidate_id(run: RunResults, name: str) -> str | None:
    return next((c["candidate_id"] for c in run.table("candidates") if c["name"] == name), None)


class Difference(NamedTuple):
    value: float
    stderr: float | None
    n: int  # prompts compared (0 when unpaired and the scores carry no n)
    paired: bool  # per-prompt differences; else the two scores and their standard errors


def paired_difference(run: RunResults, a: str, b: str, task: str) -> Difference | None:
    """a's score minus b's on the task's primary metric, over the prompts both were scored on,
    with its standard error; None when either is unscored."""
    metric = run.primary_metric(task)
    ids = _candidate_id(run, a), _candidate_id(run, b)
    if metric is None or None in ids:
        return None
    values = [run.per_prompt(cid, task, metric) for cid in ids]
    if all(values):
        shared = sorted(values[0].keys() & values[1].keys())
        if shared:
            diffs = [sum(values[0][k]) / len(values[0][k]) - sum(values[1][k]) / len(values[1][k]) for k in shared]
            mean, se = mean_stderr(diffs)
            return Difference(mean, se, len(shared), True)
    scores = run.primary_scores(task)
    sa, sb = scores.get(ids[0]), scores.get(ids[1])
    if sa is None or sb is None or sa["value"] is None or sb["value"] is None:
        return None
    ses = [sa.get("stderr"), sb.get("stderr")]
    se = math.sqrt(sum(s * s for s in ses)) if all(s is not None for s in ses) else None
    return Difference(sa["value"] - sb["value"], se, min(sa.get("n") or 0, sb.get("n") or 0), False)


def _interval(
    units: Sequence, statistic: Callable[[Sequence], float | None], level: float, iters: int, seed: int
) -> tuple[float, float] | None:
    """bootstrap_ci of the statistic; a resample without any changed entry has no lift and
    counts as the full sample (rare: it takes only unchanged tensors)."""
    full = statistic(units) if len(units) >= 2 else None
    if full is None:
        return None

    def statistic_or_full(sample: Sequence) -> float:
        value = statistic(sample)
        return full if value is None else value

    return bootstrap_ci(list(units), statistic_or_full, level=level, iters=iters, seed=seed)


def jaccard_lift_interval(
    run: RunResults, a: str, b: str, level: float = 0.95, iters: int = 1000, seed: int = 0
) -> tuple[float, float] | None:
    """Bootstrap interval of the global Jaccard lift of two models' bf16 update masks:
    (|A&B| / |A|B|) / (E|A&B| / (|A| + |B| - E|A&B|)), sums over the resampled tensors."""
    rows = [
        r
        for r in run.table("geometry_pairs")
        if r["scope"] == "tensor"
        and {r["model_a"], r["model_b"]} == {a, b}
        and r.get("overlap") is not None
        and r.get("overlap_chance") is not None
    ]

    def lift(sample: Sequence[dict]) -> float | None:
        ab = sum(r["overlap"] for r in sample)
        chance = sum(r["overlap_chance"] for r in sample)
        changed = sum(r["changed_a"] + r["changed_b"] for r in sample)
        if chance <= 0 or changed - ab <= 0:
            return None
        return (ab / (changed - ab)) / (chance / (changed - chance))

    return _interval(rows, lift, level, iters, seed)


def principal_lift_interval(
    run: RunResults, models: Sequence[str], level: float = 0.95, iters: int = 1000, seed: int = 0
) -> tuple[float, float] | None:
    """Bootstrap interval of the mean over `models` of each model's principal-weight lift
    (changed entries inside the base's principal mask over their number by chance), tensors
    resampled by name for all models together."""
    by_tensor: dict[str, dict[str, dict]] = {}
    for r in run.table("geometry_tensors"):
        if r["scope"] == "tensor" and r["model"] in models and r.get("principal_changed") is not None:
            by_tensor.setdefault(r["tensor"], {})[r["model"]] = r
    names = sorted(t for t, per in by_tensor.items() if set(per) == set(models))

    def lift(sample: Sequence[str]) -> float | None:
        lifts = []
        for m in models:
            rows = [by_tensor[t][m] for t in sample]
            chance = sum((r["principal_overlap_chance"] or 0.0) * r["principal_changed"] for r in rows)
            if chance <= 0:
                return None
            lifts.append(sum(r["principal_overlap"] for r in rows) / chance)
        return sum(lifts) / len(lifts)

    return _interval(names, lift, level, iters, seed)


def gain_kept_interval(
    run: RunResults,
    merge: str,
    own_tasks: dict[str, str],
    base: str,
    level: float = 0.95,
    iters: int = 1000,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Bootstrap interval over prompts of MergeBench's gain kept: the mean over experts e of
    (merge(t_e) - base(t_e)) / (e(t_e) - base(t_e)), each task's prompts resampled (paired across
    merge, expert and base); a resample where an expert gained nothing counts as the full sample."""
    per_task: dict[str, tuple[list[str], dict[str, dict[str, list[float]]]]] = {}
    for expert, task in own_tasks.items():
        metric = run.primary_metric(task)
        ids = {n: _candidate_id(run, n) for n in (merge, expert, base)}
        if metric is None or None in ids.values():
            return None
        values = {n: run.per_prompt(cid, task, metric) for n, cid in ids.items()}
        if not all(values.values()):
            return None
        keys = sorted(set.intersection(*(set(v) for v in values.values())))
        per_task[expert] = (keys, {n: {k: sum(v[k]) / len(v[k]) for k in keys} for n, v in values.items()})
    n = min((len(keys) for keys, _ in per_task.values()), default=0)

    def kept(sample: Sequence[int]) -> float | None:
        shares = []
        for expert, (keys, vals) in per_task.items():
            picked = [keys[i] for i in sample]
            gained = sum(vals[expert][k] - vals[base][k] for k in picked)
            if gained <= 0:
                return None
            shares.append(sum(vals[merge][k] - vals[base][k] for k in picked) / gained)
        return sum(shares) / len(shares)

    return _interval(list(range(n)), kept, level, iters, seed)
