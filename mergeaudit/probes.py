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

    for name, probe, plan in probe_plans(config.probes, base, models, refs, device): ...
"""

from __future__ import annotations

from typing import Any, Literal

import pydantic

from mergeaudit.frozen import Frozen
from mergeaudit.merging.executor import MergePlan, ModelRef


class InterpolationProbe(Frozen):
    """theta(alpha) = (1 - alpha) theta_a + alpha theta_b; the barrier is the worst dip below
    the straight line between the endpoints' scores."""

    a: str = pydantic.Field(description="Checkpoint at alpha = 0 (the base or a fine-tuned model, by name).")
    b: str = pydantic.Field(description="Checkpoint at alpha = 1, by name.")
    alphas: list[float] = pydantic.Field(
        default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0],
        min_length=3,
        description="Points on the path, both endpoints included; each is a candidate.",
    )

    @pydantic.field_validator("alphas")
    @classmethod
    def _endpoints(cls, v: list[float]) -> list[float]:
        if 0.0 not in v or 1.0 not in v:
            raise ValueError("alphas must include both endpoints 0 and 1")
        return sorted(set(v))


class TaskVectorProbe(Frozen):
    """theta(lambda) = base + lambda (theta_model - base)."""

    model: str = pydantic.Field(description="Fine-tuned model whose task vector is scaled, by name.")
    lambdas: list[float] = pydantic.Field(
        default_factory=lambda: [0.0, 0.5, 1.0, 1.5, 2.0],
        min_length=2,
        description="Scales of the task vector; each is a candidate (1 is the model itself).",
    )


class PerturbationProbe(Frozen):
    """Weight perturbations of each model, `seeds` draws per setting: Gaussian noise with a
    standard deviation of `scale` x each tensor's RMS (`weight_rms`) or x the RMS of the task
    vector on its support, added only there (`task_vector`, as the fragility literature
    perturbs updates), and a DARE-style random drop of a fraction of the task vector (rescaled
    by 1 / (1 - rate))."""

    models: list[str] | None = pydantic.Field(None, description="Default: every fine-tuned model.")
    gaussian_scales: list[float] = pydantic.Field(
        default_factory=lambda: [0.01, 0.03, 0.1], description="Noise standard deviations, relative (see scale_to)."
    )
    gaussian_scale_to: list[Literal["weight_rms", "task_vector"]] = pydantic.Field(
        default_factory=lambda: ["weight_rms"],
        min_length=1,
        description="What the noise is scaled to; each entry is its own probe family (gaussian, gaussian_task_vector).",
    )
    drop_rates: list[float] = pydantic.Field(
        default_factory=lambda: [0.3, 0.6, 0.9], description="Fractions of the task vector dropped, in [0, 1)."
    )
    seeds: int = pydantic.Field(2, ge=1, le=64, description="Random draws per setting.")

    @pydantic.model_validator(mode="after")
    def _ranges(self) -> PerturbationProbe:
        if any(s < 0 for s in self.gaussian_scales):
            raise ValueError("gaussian_scales must be >= 0")
        if any(not 0 <= r < 1 for r in self.drop_rates):
            raise ValueError("drop_rates must lie in [0, 1)")
        return self


class ProbeSettings(Frozen):
    """Fragility probes, scored as candidates like any merge."""

    interpolations: list[InterpolationProbe] = pydantic.Field(
        default_factory=list, description="Linear paths between two checkpoints (barriers)."
    )
    task_vectors: list[TaskVectorProbe] = pydantic.Field(
        default_factory=list, description="A model's task vector scaled up and down from the base."
    )
    perturbation: PerturbationProbe | None = pydantic.Field(
        None, description="Noise and random drops on each model's weights (empty: none)."
    )


def probe_plans(
    probes: ProbeSettings, base_name: str, model_names: list[str], refs: dict[str, ModelRef], device: str = "cpu"
) -> list[tuple[str, dict[str, Any], MergePlan]]:
    """(name, probe description, plan) for every probe point asked for; `model_names` are the
    fine-tuned models (the perturbed ones by default), `refs` every checkpoint by name."""
    base = refs[base_name]
    out = []

    def plan(method: str, models: list[ModelRef], **kw) -> MergePlan:
        return MergePlan(method=method, base=base, models=models, compute_dtype="float32", device=device, **kw)

    for p in probes.interpolations:
        for a in p.alphas:
            out.append(
                (
                    f"interp({p.a}~{p.b}; alpha={a:g})",
                    {"family": "interpolation", "path": f"{p.a}~{p.b}", "x": a, "seed": None},
                    plan("linear", [refs[p.a], refs[p.b]], model_parameters=[{"weight": 1 - a}, {"weight": a}]),
                )
            )
    for p in probes.task_vectors:
        for lam in p.lambdas:
            out.append(
                (
                    f"task_vector({p.model}; lambda={lam:g})",
                    {"family": "task_vector", "path": p.model, "x": lam, "seed": None},
                    plan("task_arithmetic", [refs[p.model]], parameters={"lambda": lam}),
                )
            )
    pert = probes.perturbation
    if pert is not None:
        for m in pert.models or model_names:
            for seed in range(pert.seeds):
                for to in pert.gaussian_scale_to:
                    family, label = ("gaussian", "") if to == "weight_rms" else ("gaussian_task_vector", "tv ")
                    for s in pert.gaussian_scales:
                        out.append(
                            (
                                f"noise({m}; {label}scale={s:g}, seed={seed})",
                                {"family": family, "path": m, "x": s, "seed": seed},
                                plan("perturb_gaussian", [refs[m]], parameters={"scale": s, "scale_to": to}, seed=seed),
                            )
                        )
                for r in pert.drop_rates:
                    out.append(
                        (
                            f"drop({m}; rate={r:g}, seed={seed})",
                            {"family": "drop", "path": m, "x": r, "seed": seed},
                            plan(
                                "dare_linear", [refs[m]], parameters={"density": 1 - r, "semantics": "paper"}, seed=seed
                            ),
                        )
                    )
    return out
