"""The merge audit flow, as a list of stages:
resolve checkpoints -> geometry -> Fisher -> plan candidates -> evaluate -> tables -> artifacts.

Run it on embedded defaults (no server: Prefect starts an ephemeral API in-process):
    mergeaudit audit audit.yaml
From a deployment, the UI renders `config` as a form; `config_uri` names an AuditConfig YAML in
the store instead (the nightly deployment uses it, so the audit can change without a
redeploy), and `add_models` appends checkpoints (the on-checkpoint trigger fills it from the
event). With `routing: pools` each evaluation is a run of the `evaluate/gpu` deployment.
"""

from __future__ import annotations

import datetime as dt
import re

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment
from prefect.runtime import flow_run

from flows.credentials import use_storage_credentials
from mergeaudit import audit
from mergeaudit.config import AuditConfig, CheckpointSpec, load_config, with_models
from mergeaudit.errors import ConfigError, EvaluationError
from tasks.audit import (
    compute_geometry,
    estimate_fisher,
    evaluate_candidate,
    finish_run,
    plan_candidates,
    resolve_checkpoints,
)


@flow(name="merge-audit", log_prints=True, persist_result=True)
def merge_audit(
    config: AuditConfig | None = None,
    config_uri: str | None = None,
    add_models: list[CheckpointSpec] | None = None,
) -> dict:
    """Audit merges of the configured checkpoints; returns the run id, table URIs and a summary."""
    config = with_models(resolve_config(config, config_uri), add_models or [])
    run_id = audit.new_run_id()
    started_at = dt.datetime.now(dt.timezone.utc)
    use_storage_credentials(config.storage)
    records = resolve_checkpoints(config)
    geometry = compute_geometry(config, records)
    fisher_uris = {name: estimate_fisher(config, records, name) for name in audit.fisher_models(config)}
    candidates = plan_candidates(config, records, fisher_uris)
    if config.routing == "pools":
        evaluations = evaluate_on_pool(config, candidates)
    else:
        evaluations = [evaluate_candidate(c, config.evaluation, config.storage, config.results_uri) for c in candidates]
    outcome = finish_run(config, run_id, started_at, geometry, candidates, evaluations)
    publish_artifacts(config, outcome)
    get_run_logger().info("run %s wrote %s", run_id, ", ".join(outcome.tables))
    return outcome.model_dump(exclude={"markdown"})


def resolve_config(config: AuditConfig | None, config_uri: str | None) -> AuditConfig:
    if (config is None) == (config_uri is None):
        raise ConfigError("give exactly one of `config` and `config_uri`")
    return config if config is not None else load_config(config_uri)


@task(name="run-evaluation", tags=["dispatch"], task_run_name="dispatch-{candidate.name}")
def dispatch_evaluation(config: AuditConfig, candidate: audit.Candidate, parent: str) -> dict:
    """Start (or, with the same idempotency key, find) the child run and wait for it."""
    child = run_deployment(
        config.evaluate_deployment,
        parameters={"candidate": candidate.model_dump(mode="json"),
                    "evaluation": config.evaluation.model_dump(mode="json"),
                    "storage": config.storage.model_dump(mode="json"), "results_uri": config.results_uri},
        idempotency_key=f"{parent}:{candidate.candidate_id}",
        flow_run_name=f"evaluate-{candidate.candidate_id[:12]}",
        timeout=None,
        poll_interval=2,
    )
    return {"candidate": candidate.name, "candidate_id": candidate.candidate_id, "flow_run": str(child.id),
            "state": child.state.type.value if child.state else None,
            "message": child.state.message if child.state else None, "work_pool": child.work_pool_name}


def evaluate_on_pool(config: AuditConfig, candidates: list[audit.Candidate]) -> list[audit.EvaluationRecord]:
    """One `evaluate` run per candidate on the GPU pool, concurrently; every child's final
    state is checked and any failure fails the audit with a summary."""
    parent = str(flow_run.get_id() or audit.new_run_id())
    children = [f.result() for f in [dispatch_evaluation.submit(config, c, parent) for c in candidates]]
    failed = [c for c in children if c["state"] != StateType.COMPLETED.value]
    if failed:
        lines = "; ".join(f"{c['candidate']} ({c['flow_run']}): {c['state']} {c['message'] or ''}".strip()
                          for c in failed)
        raise EvaluationError(f"{len(failed)} of {len(children)} evaluations did not complete: {lines}")
    return [audit.stored_evaluation(c, config.evaluation, config.results_uri) for c in candidates]


def artifact_key(name: str, suffix: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", f"{name}-{suffix}".lower()).strip("-")


def publish_artifacts(config: AuditConfig, outcome: audit.RunOutcome) -> None:
    """A markdown report and a keyed leaderboard table: the UI shows both across nightly runs."""
    create_markdown_artifact(outcome.markdown, key=artifact_key(config.name, "report"),
                             description=f"merge audit {config.name}, run {outcome.run_id}")
    create_table_artifact(outcome.summary, key=artifact_key(config.name, "leaderboard"),
                          description=f"candidates of run {outcome.run_id}, best first")
