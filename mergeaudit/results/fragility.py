"""Fragility summaries from the scores of probe points, with their uncertainty, for every
evaluated task (on its primary metric):

- interpolation paths: the barrier height, max over alpha of [(1 - alpha) s(0) + alpha s(1) -
  s(alpha)] (0 when the path never dips below the straight line between its endpoints), with a
  95% percentile bootstrap interval that resamples prompts (the same prompts at every alpha:
  the points are paired), in ci_low / ci_high; and the score at alpha = 0.5;
- task-vector paths: the best lambda, the score there, and the score at lambda = 1;
- perturbations (gaussian noise, random drop), per setting x: the perturbed score (mean over
  seeds) and the score drop, the unperturbed model's score minus it. Standard errors take the
  prompt as the unit: per prompt, the seeds' mean, and for the drop own_i - perturbed_i; then the
  standard error across prompts. Without per-prompt rows: sqrt(se_own^2 + mean(se_seed^2) / S).

Probe points carry their setting as columns (probe_family, probe_path, probe_x, probe_seed);
summary rows say theirs in probe_family / probe_x.

    cand_rows, score_rows = summarize(run)     # run: a RunResults with candidates, scores, samples
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict

import numpy as np

from mergeaudit.results.scores import RunResults
from mergeaudit.results.stats import mean_stderr

BOOTSTRAP_ITERS = 1000
LEVEL = 0.95


def barrier_height(points: list[tuple[float, float]]) -> float:
    """max over alpha of [(1 - alpha) s(0) + alpha s(1) - s(alpha)] for (alpha, score) points."""
    pts = dict(points)
    s0, s1 = pts[0.0], pts[1.0]
    return max((1 - a) * s0 + a * s1 - s for a, s in pts.items())


def barrier_ci(
    alphas: list[float], per_prompt: np.ndarray, iters: int = BOOTSTRAP_ITERS, level: float = LEVEL, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the barrier height: `per_prompt` is prompts x alphas
    (each prompt's mean score at each alpha); prompts are resampled with replacement."""
    a = np.asarray(alphas, dtype=float)
    i0, i1 = int(np.argmin(np.abs(a - 0.0))), int(np.argmin(np.abs(a - 1.0)))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, per_prompt.shape[0], size=(iters, per_prompt.shape[0]))
    means = per_prompt[idx].mean(axis=1)  # iters x alphas
    line = (1 - a)[None, :] * means[:, [i0]] + a[None, :] * means[:, [i1]]
    heights = np.sort((line - means).max(axis=1))
    lo = heights[int(math.floor((1 - level) / 2 * (iters - 1)))]
    hi = heights[int(math.ceil((1 + level) / 2 * (iters - 1)))]
    return float(lo), float(hi)


def _prompt_matrix(run: RunResults, cids: list[str], task: str, metric: str) -> np.ndarray | None:
    """prompts x candidates of per-prompt means on the prompts every candidate has."""
    per = [run.per_prompt(cid, task, metric) for cid in cids]
    if any(p is None for p in per):
        return None
    shared = sorted(set.intersection(*(set(p) for p in per)))
    if len(shared) < 2:
        return None
    return np.array([[sum(p[k]) / len(p[k]) for p in per] for k in shared])


def _summary_id(family: str, path: str, run: RunResults) -> str:
    ids = sorted(c["candidate_id"] for c in run.candidates("probe"))
    return hashlib.sha256(json.dumps([family, path, ids]).encode()).hexdigest()[:20]


def summarize(run: RunResults) -> tuple[list[dict], list[dict]]:
    """Candidate rows for each probe path and their summary score rows, for every task."""
    probes = [c for c in run.candidates("probe") if c.get("probe_family")]
    if not probes:
        return [], []
    own = {c["name"]: c["candidate_id"] for c in run.candidates("checkpoint")}
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for c in probes:
        groups[(c["probe_family"], c["probe_path"])].append(c)
    cand_rows, score_rows = [], []
    metrics = {t: run.primary_metric(t) for t in run.tasks()}
    for (family, path), members in sorted(groups.items()):
        cid = _summary_id(family, path, run)
        cand_rows.append(
            {
                "candidate_id": cid,
                "name": f"probe:{family}:{path}",
                "kind": "probe_summary",
                "method": family,
                "params_json": json.dumps({"metrics": metrics}, sort_keys=True),
                "input_names": path.split("~"),
                "probe_family": family,
                "probe_path": path,
            }
        )
        for task, metric in metrics.items():
            if metric is None:
                continue
            value = run.primary_scores(task)
            scored = [c for c in members if c["candidate_id"] in value]
            if not scored:
                continue

            def row(
                name: str,
                v: float | None,
                se: float | None = None,
                n: int | None = None,
                x: float | None = None,
                ci: tuple[float, float] | None = None,
                task: str = task,
                cid: str = cid,
                scored: list = scored,
                family: str = family,
            ) -> None:
                if v is not None:
                    score_rows.append(
                        {
                            "candidate_id": cid,
                            "task": task,
                            "metric": name,
                            "filter": "probe",
                            "value": float(v),
                            "stderr": se,
                            "n": n if n is not None else len(scored),
                            "probe_family": family,
                            "probe_x": x,
                            "ci_low": ci[0] if ci else None,
                            "ci_high": ci[1] if ci else None,
                        }
                    )

            if family == "interpolation":
                scored.sort(key=lambda c: c["probe_x"])
                pts = [(c["probe_x"], value[c["candidate_id"]]["value"]) for c in scored]
                xs = dict(pts)
                if 0.0 in xs and 1.0 in xs:
                    mat = _prompt_matrix(run, [c["candidate_id"] for c in scored], task, metric)
                    ci = barrier_ci([p[0] for p in pts], mat) if mat is not None else None
                    row("barrier_height", barrier_height(pts), ci=ci)
                row("midpoint_score", xs.get(0.5), x=0.5)
            elif family == "task_vector":
                pts = sorted((c["probe_x"], value[c["candidate_id"]]["value"]) for c in scored)
                best = max(pts, key=lambda p: p[1])
                row("best_lambda", best[0])
                row("score_at_best_lambda", best[1], x=best[0])
                row("score_at_lambda_1", dict(pts).get(1.0), x=1.0)
            else:
                by_x: dict[float, list[dict]] = defaultdict(list)
                for c in scored:
                    by_x[c["probe_x"]].append(c)
                own_row = run.primary_scores(task).get(own.get(path, ""))
                for x, seeds in sorted(by_x.items()):
                    _perturbation_rows(run, row, x, seeds, own_row, value, task, metric)
    return cand_rows, score_rows


def _perturbation_rows(
    run: RunResults,
    row,
    x: float,
    seeds: list[dict],
    own_row: dict | None,
    value: dict[str, dict],
    task: str,
    metric: str,
) -> None:
    ids = [c["candidate_id"] for c in seeds]
    mean = sum(value[i]["value"] for i in ids) / len(ids)
    mat = _prompt_matrix(run, ids + ([own_row["candidate_id"]] if own_row else []), task, metric)
    if mat is not None:
        perturbed = mat[:, : len(ids)].mean(axis=1)
        row("perturbed_score", mean, mean_stderr(perturbed.tolist())[1], len(ids), x)
        if own_row is not None:
            row("score_drop", own_row["value"] - mean, mean_stderr((mat[:, -1] - perturbed).tolist())[1], len(ids), x)
        return
    ses = [value[i]["stderr"] for i in ids]
    se_pert = math.sqrt(sum(s * s for s in ses) / len(ses) / len(ses)) if all(s is not None for s in ses) else None
    row("perturbed_score", mean, se_pert, len(ids), x)
    if own_row is not None:
        se_own = own_row.get("stderr")
        se = math.sqrt(se_own**2 + se_pert**2) if se_own is not None and se_pert is not None else None
        row("score_drop", own_row["value"] - mean, se, len(ids), x)
