"""What an audit scores: the references (base and fine-tunes) and one merge recipe per grid
point and probe point, each with a content id (recipe, input fingerprints, code version), so a
rerun recognises work it has done."""

from __future__ import annotations

from typing import Any

import mergeaudit
from mergeaudit import probes
from mergeaudit.audit.records import Candidate, CheckpointRecord, digest
from mergeaudit.config import AuditConfig, StrategySpec
from mergeaudit.merging.executor import MergePlan, ModelRef, prepare


def fisher_models(config: AuditConfig) -> list[str]:
    """Names of the models whose Fisher some strategy needs."""
    needed: list[str] = []
    for strat in config.strategies:
        names = config.strategy_models(strat)
        if strat.uses_fisher(names):
            needed += [n for n in names if n not in needed]
    return needed


def merge_plan(
    config: AuditConfig,
    records: dict[str, CheckpointRecord],
    strat: StrategySpec,
    point: dict[str, Any],
    fisher_uris: dict[str, str],
) -> MergePlan:
    names = config.strategy_models(strat)
    base = records[config.base.name]
    return MergePlan(
        method=strat.method,
        base=ModelRef(id=base.name, uri=base.uri),
        models=[ModelRef(id=n, uri=records[n].uri) for n in names],
        parameters=point,
        model_parameters=[strat.model_params.get(n, {}) for n in names],
        compute_dtype="float32",
        out_dtype=strat.out_dtype,
        seed=strat.seed,
        device=config.evaluation.device,
        fisher={n: fisher_uris[n] for n in names if n in fisher_uris},
    )


def recipe_id(plan: MergePlan, inputs: list[CheckpointRecord]) -> str:
    """The id of a merge or probe candidate: its plan (not where it runs), its inputs'
    fingerprints and the code version."""
    return digest(
        {
            "plan": plan.model_dump(mode="json", exclude={"device"}),
            "fingerprints": [r.fingerprint for r in inputs],
            "version": mergeaudit.__version__,
        }
    )[:20]


def check_plan(plan: MergePlan) -> None:
    """Validate a plan against the headers (nothing is read) where it is planned: the device is
    the evaluating worker's (a GPU-pool child of a CPU-pool audit), checked where the merge runs."""
    prepare(plan.model_copy(update={"device": "cpu"}))


def plan_candidates(
    config: AuditConfig, records: dict[str, CheckpointRecord], fisher_uris: dict[str, str] | None = None
) -> list[Candidate]:
    """The references (base and fine-tunes, when score_inputs) and one merge per grid point.

    Every merge plan is validated here against the real headers (each tensor's parameters,
    shapes, Fisher sources), so a bad strategy fails before any evaluation starts.
    """
    base = records[config.base.name]
    out: list[Candidate] = []
    if config.score_inputs:
        for spec in [config.base, *config.models]:
            rec = records[spec.name]
            cid = digest({"kind": "checkpoint", "fingerprint": rec.fingerprint})[:20]
            out.append(Candidate(candidate_id=cid, name=spec.name, kind="checkpoint", inputs=[rec], base=base))
    for strat in config.strategies:
        names = config.strategy_models(strat)
        for point in strat.points():
            plan = merge_plan(config, records, strat, point, fisher_uris or {})
            check_plan(plan)
            label = ",".join(f"{k}={point[k]}" for k in sorted(strat.grid))
            name = f"{strat.method}({'+'.join(names)}{'; ' + label if label else ''})"
            out.append(
                Candidate(
                    candidate_id=recipe_id(plan, [base] + [records[n] for n in names]),
                    name=name,
                    kind="merge",
                    inputs=[records[n] for n in names],
                    base=base,
                    plan=plan,
                )
            )
    refs = {name: ModelRef(id=name, uri=rec.uri) for name, rec in records.items()}
    for name, probe, plan in probes.probe_plans(
        config.probes, config.base.name, [m.name for m in config.models], refs, config.evaluation.device
    ):
        check_plan(plan)
        out.append(
            Candidate(
                candidate_id=recipe_id(plan, [records[m.id] for m in [plan.base, *plan.models]]),
                name=name,
                kind="probe",
                inputs=[records[m.id] for m in plan.models],
                base=base,
                plan=plan,
                probe=probe,
            )
        )
    seen: set[str] = set()
    return [c for c in out if not (c.candidate_id in seen or seen.add(c.candidate_id))]
