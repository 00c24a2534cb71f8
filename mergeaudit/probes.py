"""Fragility probes: recipes along interpolation paths and under weight perturbations.

Each probe point is an ordinary candidate (a MergePlan materialised where it is evaluated):
- interpolation between checkpoints a and b at alpha: `linear` with weights (1 - alpha, alpha);
- a task vector scaled by lambda: `task_arithmetic` with one model and `lambda`;
- Gaussian noise of `scale` x each tensor's RMS (family `gaussian`) or x the task vector's RMS
  on its support, added only there (family `gaussian_task_vector`): `perturb_gaussian`, one
  draw per seed;
- a DARE-style random drop of a fraction of the task vector: `dare_linear` with density
  1 - rate and `semantics: paper` (kept entries rescaled by 1 / (1 - rate)), per seed.

Each point's setting (family, path, x, seed) becomes columns of its candidate row; the
summaries computed from their scores (barrier heights with bootstrap intervals, perturbation
drops with standard errors) live in mergeaudit.results.fragility.

    for name, probe, plan in probe_plans(config, refs): ...
"""

from __future__ import annotations

from typing import Any

from mergeaudit.config import AuditConfig
from mergeaudit.merging.executor import MergePlan, ModelRef


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
                for to in pert.gaussian_scale_to:
                    family, label = ("gaussian", "") if to == "weight_rms" else ("gaussian_task_vector", "tv ")
                    for s in pert.gaussian_scales:
                        out.append((f"noise({m}; {label}scale={s:g}, seed={seed})",
                                    {"family": family, "path": m, "x": s, "seed": seed},
                                    plan("perturb_gaussian", [refs[m]], parameters={"scale": s, "scale_to": to},
                                         seed=seed)))
                for r in pert.drop_rates:
                    out.append((f"drop({m}; rate={r:g}, seed={seed})",
                                {"family": "drop", "path": m, "x": r, "seed": seed},
                                plan("dare_linear", [refs[m]], parameters={"density": 1 - r, "semantics": "paper"},
                                     seed=seed)))
    return out
