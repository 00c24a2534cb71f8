"""Fragility probes: recipes along interpolation paths and under weight perturbations, and
the summaries computed from their scores.

Each probe point is an ordinary candidate (a MergePlan materialised where it is evaluated):
- interpolation between checkpoints a and b at alpha: `linear` with weights (1 - alpha, alpha);
- a task vector scaled by lambda: `task_arithmetic` with one model and `lambda`;
- Gaussian noise of `scale` x each tensor's RMS: `perturb_gaussian`, one draw per seed;
- a DARE-style random drop of a fraction of the task vector: `dare_linear` with density
  1 - rate and `semantics: paper` (kept entries rescaled by 1 / (1 - rate)), per seed.

From their scores on the primary metric: the barrier height of each interpolation path,
max over alpha of [(1 - alpha) s(0) + alpha s(1) - s(alpha)] (0 when the path never dips below
the straight line between its endpoints), the best lambda of each task-vector path, and the
score drop of each perturbation setting, the model's own score minus the mean over seeds.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from typing import Any

from mergeaudit.config import AuditConfig
from mergeaudit.merging.executor import MergePlan, ModelRef

VERIFIER_METRICS = ("numeric_match", "math_verify", "code_pass")


def probe_plans(config: AuditConfig, refs: dict[str, ModelRef]) -> list[tuple[str, dict[str, Any], MergePlan]]:
    """(name, probe description, plan) for every probe point the config asks for."""
    base = refs[config.base.name]
    device = config.evaluation.device
    out = []

    def plan(method: str, models: list[ModelRef], **kw) -> MergePlan:
        return MergePlan(method=method, base=base, models=models, compute_dtype="float32", device=device, **kw)

    for p in config.probes.interpolations:
        for a in p.alphas:
            out.append((f"interp({p.a}~{p.b}; alpha={a:g})",
                        {"family": "interpolation", "path": f"{p.a}~{p.b}", "x": a, "seed": None},
                        plan("linear", [refs[p.a], refs[p.b]], model_parameters=[{"weight": 1 - a}, {"weight": a}])))
    for p in config.probes.task_vectors:
        for lam in p.lambdas:
            out.append((f"task_vector({p.model}; lambda={lam:g})",
                        {"family": "task_vector", "path": p.model, "x": lam, "seed": None},
                        plan("task_arithmetic", [refs[p.model]], parameters={"lambda": lam})))
    pert = config.probes.perturbation
    if pert is not None:
        for m in pert.models or [s.name for s in config.models]:
            for seed in range(pert.seeds):
                for s in pert.gaussian_scales:
                    out.append((f"noise({m}; scale={s:g}, seed={seed})",
                                {"family": "gaussian", "path": m, "x": s, "seed": seed},
                                plan("perturb_gaussian", [refs[m]], parameters={"scale": s}, seed=seed)))
                for r in pert.drop_rates:
                    out.append((f"drop({m}; rate={r:g}, seed={seed})",
                                {"family": "drop", "path": m, "x": r, "seed": seed},
                                plan("dare_linear", [refs[m]], parameters={"density": 1 - r, "semantics": "paper"},
                                     seed=seed)))
    return out


def primary_metric(scores: list[dict], task: str) -> str | None:
    """The metric that ranks candidates on a task: its verifier's reward, else exact match."""
    names = {s["metric"] for s in scores if s["task"] == task}
    for name in (*VERIFIER_METRICS, "exact_match"):
        if name in names:
            return name
    return min(names) if names else None


def barrier_height(points: list[tuple[float, float]]) -> float:
    """max over alpha of [(1 - alpha) s(0) + alpha s(1) - s(alpha)] for (alpha, score) points."""
    pts = dict(points)
    s0, s1 = pts[0.0], pts[1.0]
    return max((1 - a) * s0 + a * s1 - s for a, s in pts.items())


def summarize(config: AuditConfig, candidates: list, scores: list[dict]) -> tuple[list[dict], list[dict]]:
    """Candidate rows for each probe path and their summary score rows."""
    task = config.evaluation.tasks[0]
    metric = primary_metric(scores, task)
    if metric is None:
        return [], []
    value = {s["candidate_id"]: s["value"] for s in scores if s["task"] == task and s["metric"] == metric}
    own = {c.inputs[0].name: value.get(c.candidate_id) for c in candidates if c.kind == "checkpoint"}
    groups: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for c in candidates:
        if c.kind == "probe" and c.candidate_id in value:
            groups[(c.probe["family"], c.probe["path"])].append((c.probe["x"], value[c.candidate_id]))
    cand_rows, score_rows = [], []
    for (family, path), pts in sorted(groups.items()):
        pts.sort()
        cid = hashlib.sha256(json.dumps([family, path, [c.candidate_id for c in candidates]]).encode()).hexdigest()[:20]
        cand_rows.append({"candidate_id": cid, "name": f"probe:{family}:{path}", "kind": "probe_summary",
                          "method": family, "params_json": json.dumps({"metric": metric, "task": task, "points": pts}),
                          "input_names": path.split("~")})

        def row(name: str, v: float | None, filt: str = "probe", n: int = len(pts), cid: str = cid) -> None:
            if v is not None:
                score_rows.append({"candidate_id": cid, "task": task, "metric": name, "filter": filt,
                                   "value": float(v), "stderr": None, "n": n})

        if family == "interpolation":
            row("barrier_height", barrier_height(pts))
            row("midpoint_score", dict(pts).get(0.5))
        elif family == "task_vector":
            best = max(pts, key=lambda p: p[1])
            row("best_lambda", best[0])
            row("score_at_best_lambda", best[1])
            row("score_at_lambda_1", dict(pts).get(1.0))
        else:
            by_x: dict[float, list[float]] = defaultdict(list)
            for x, s in pts:
                by_x[x].append(s)
            for x, vals in sorted(by_x.items()):
                mean = sum(vals) / len(vals)
                row("perturbed_score", mean, f"{family}@{x:g}", len(vals))
                if own.get(path) is not None:
                    row("score_drop", own[path] - mean, f"{family}@{x:g}", len(vals))
    return cand_rows, score_rows
