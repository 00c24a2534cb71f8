"""The stages of a merge audit as plain library functions; the Prefect flow only chains them.

    config = load_config("audit.yaml")
    records = preflight(config)                      # open + validate everything, no tensor read
    fisher_uris = {n: estimate_fisher(config, records, n) for n in fisher_models(config)}
    geo = compute_geometry(config, records, fisher_uris)  # streamed, per tensor and model
    cands = plan_candidates(config, records)          # small, serialisable recipes
    evals = [evaluate_to_store(c, config.evaluation, config.storage, config.results_uri) for c in cands]
    finish_run(config, run_id, started_at, records, geo, cands, evals)   # Parquet tables

Stages exchange URIs and small records (pydantic models), never tensors or models: a recipe is
materialised next to where it is evaluated. By responsibility:

- `stages`: preflight, Fisher, geometry, committing a run (what the flow calls);
- `candidates`: what is scored, and the content ids of recipes;
- `materialize`: a candidate's weights streamed into a model or a local folder;
- `evaluations`: scoring one candidate, and the store of evaluations;
- `records`: the records stages exchange; `rows`: the table rows built from them.
"""

from mergeaudit.audit.candidates import fisher_models, merge_plan, plan_candidates, recipe_id
from mergeaudit.audit.evaluations import (
    evaluate_candidate,
    evaluate_to_store,
    evaluation_key,
    failed_evaluation,
    load_evaluation,
    stored_evaluation,
)
from mergeaudit.audit.materialize import candidate_tensors, materialize, release_device_memory, save_candidate
from mergeaudit.audit.records import (
    Candidate,
    CandidateResult,
    CheckpointRecord,
    EvaluationRecord,
    RunOutcome,
    new_run_id,
)
from mergeaudit.audit.rows import candidate_rows, checkpoint_rows, package_versions, result_rows, run_row
from mergeaudit.audit.stages import (
    compute_geometry,
    estimate_fisher,
    finish_run,
    geometry_run,
    preflight,
    resolve_checkpoints,
)

__all__ = [
    "Candidate",
    "CandidateResult",
    "CheckpointRecord",
    "EvaluationRecord",
    "RunOutcome",
    "candidate_rows",
    "candidate_tensors",
    "checkpoint_rows",
    "compute_geometry",
    "estimate_fisher",
    "evaluate_candidate",
    "evaluate_to_store",
    "evaluation_key",
    "failed_evaluation",
    "finish_run",
    "fisher_models",
    "geometry_run",
    "load_evaluation",
    "materialize",
    "merge_plan",
    "new_run_id",
    "package_versions",
    "plan_candidates",
    "preflight",
    "recipe_id",
    "release_device_memory",
    "resolve_checkpoints",
    "result_rows",
    "run_row",
    "save_candidate",
    "stored_evaluation",
]
