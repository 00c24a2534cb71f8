"""The merge audit flow, as a list of stages:
preflight (checkpoints, series steps and strategies checked against the headers) -> Fisher -> geometry
-> plan candidates -> evaluate -> tables (committed, with the regression check against the previous
run of this audit) -> report -> artifacts.

A candidate whose evaluation fails for good does not stop the others: the run commits its
tables with the failure recorded, publishes the report, and then ends Failed with a summary,
as it does when the regression alarm fires (the event `mergeaudit.regression` carries the
details).

Run it on embedded defaults (no server: Prefect starts an ephemeral API in-process):
    mergeaudit audit audit.yaml
From a deployment, the UI renders `config` as a form, starting from a small audit of the shipped
toy experts (Quick Run runs it); `config_uri` names an AuditConfig YAML in the store instead
(the nightly deployment uses it, so the audit can change without a redeploy), and `add_models`
appends checkpoints (the on-checkpoint trigger fills it from the event, and `landed_event` with
the event's resource id, checked against the event contract). With `routing: pools` each
evaluation is a run of the `evaluate/gpu` deployment.
"""

from __future__ import annotations

import datetime as dt
import re

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment
from prefect.events import emit_event
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.states import Failed

from mergeaudit import audit, report, store
from mergeaudit.checkpoint import reads
from mergeaudit.config import AuditConfig, CheckpointSpec, load_config, parse_config, with_models
from mergeaudit.demo import quick_run_config
from mergeaudit.errors import ConfigError
from mergeaudit.flows.credentials import use_storage_credentials
from mergeaudit.flows.lifetime import end_with_worker
from mergeaudit.progress import AuditProgress
from mergeaudit.tasks.audit import (
    compute_geometry,
    estimate_fisher,
    evaluate_candidate,
    finish_run,
    plan_candidates,
    preflight,
)

STAGES = ["resolve", "fisher", "geometry", "plan", "evaluate", "tables", "report"]


# The form's starting point (plain data: its paths stay relative to the project folder the
# deployments run in): the demo's shape on the toy experts shipped in the checkout, so the UI's
# Quick Run works on a fresh server.
QUICK_RUN = quick_run_config()


@flow(name="merge-audit", log_prints=True, persist_result=True)
def merge_audit(
    config: AuditConfig | None = QUICK_RUN,
    config_uri: str | None = None,
    add_models: list[CheckpointSpec] | None = None,
    landed_event: str | None = None,
) -> dict:
    """Audit merges of the configured checkpoints; returns the run id, table URIs and a summary.

    Args:
        config: The audit: base, fine-tuned models, merge strategies, evaluation, results store.
            Starts as a small audit of the toy experts shipped in the checkout (Quick Run runs
            it); config_uri, when given, is used instead.
        config_uri: Path or s3:// URI of an AuditConfig YAML, read when the run starts (edit the
            file, no redeploy). When given, the config parameter is not used.
        add_models: Checkpoints audited besides the config's models; the on-checkpoint trigger
            fills it from the event (name, uri, kind). One named like a configured model replaces
            it (see the config's landed_same_name).
        landed_event: Set by the on-checkpoint trigger: the resource id of the event that started
            the run. The trigger takes every `mergeaudit.checkpoint.landed` event, and a run
            started by one that breaks the event contract fails, naming what is wrong, instead
            of the event being dropped without a word.
    """
    end_with_worker(flow_run.get_id())  # a stopped or killed worker does not leave it waiting
    if landed_event is not None:
        check_landed_event(landed_event, add_models or [])
    config = with_models(resolve_config(config, config_uri), add_models or [])
    with use_storage_credentials(config.storage):  # this run's S3 credentials, not the process's
        reads_before = store.bytes_read()
        run_id = audit.new_run_id()
        started_at = dt.datetime.now(dt.timezone.utc)
        progress = audit_progress(config)
        progress.stage("resolve")
        records = preflight(config)
        progress.stage("fisher")
        fisher_uris = {name: estimate_fisher(config, records, name) for name in audit.fisher_models(config)}
        progress.stage("geometry")
        geometry = compute_geometry(config, records, fisher_uris)
        progress.stage("plan")
        candidates = plan_candidates(config, records, fisher_uris)
        progress.stage("evaluate", candidates=len(candidates))
        if config.routing == "pools":
            evaluations = evaluate_on_pool(config, candidates, progress)
        else:
            evaluations = []
            for c in candidates:
                evaluations.append(evaluate_inline(config, c))
                progress.finished(c.name, ok=evaluations[-1].status == "ok")
        progress.stage("tables")
        outcome = finish_run(
            config, run_id, started_at, records, geometry, candidates, evaluations, store.bytes_read_since(reads_before)
        )
        progress.stage("report")
        publish_report(config, outcome)
        progress.close()
        get_run_logger().info("run %s committed %s", run_id, ", ".join(outcome.tables))
        for note in outcome.notes:
            get_run_logger().warning(note)
        for line in reads.summary_lines(outcome.bytes_read, outcome.input_sizes):
            get_run_logger().info(line)
        result = outcome.model_dump(mode="json")
        problems = outcome.problems()
        if outcome.regressions and outcome.regressions.regressions:
            emit_event(
                event="mergeaudit.regression",
                resource={
                    "prefect.resource.id": f"mergeaudit.audit.{artifact_key(config.name, 'audit')}",
                    "prefect.resource.name": config.name,
                },
                payload={**outcome.regressions.event_payload(), "results_uri": config.results_uri},
            )
        if problems:
            return Failed(message=problems, data=result)
        return result


def submit(config: AuditConfig, deployment: str = "merge-audit/on-demand") -> dict:
    """Start a run of a merge-audit deployment with `config` as its parameter, without waiting
    (`mergeaudit submit`); returns the run's id, name and state, and its URL when
    PREFECT_UI_URL is set."""
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    try:
        run = run_deployment(deployment, parameters={"config": config.model_dump(mode="json")}, timeout=0)
    except ObjectNotFound:
        api = PREFECT_API_URL.value() or "the ephemeral API (PREFECT_API_URL is unset)"
        raise ConfigError(
            f"no deployment {deployment!r} at {api}; deploy prefect.yaml (`prefect deploy --all`) or point "
            "PREFECT_API_URL at the server that has it"
        ) from None
    ui = PREFECT_UI_URL.value()
    return {
        "id": str(run.id),
        "name": run.name,
        "state": run.state.name if run.state else None,
        "url": f"{ui.rstrip('/')}/runs/flow-run/{run.id}" if ui else None,
    }


def evaluate_inline(config: AuditConfig, candidate: audit.Candidate) -> audit.EvaluationRecord:
    """Evaluate in this process; a failure (after retries) is recorded, not raised."""
    state = evaluate_candidate(candidate, config.evaluation, config.storage, config.results_uri, return_state=True)
    if state.is_completed():
        return state.result()
    return audit.failed_evaluation(candidate, f"{state.name}: {state.message}")


def check_landed_event(resource_id: str, add_models: list[CheckpointSpec]) -> None:
    """Refuse a run started by a landed event that breaks the contract (mergeaudit.watch)."""
    from mergeaudit import watch

    problems = [p for m in add_models for p in watch.event_problems(watch.EVENT, resource_id, m.model_dump())]
    if not add_models:
        problems.append("the event's payload names no checkpoint")
    if problems:
        raise ConfigError(
            f"the {watch.EVENT} event for {resource_id!r} breaks the event contract (README, The event "
            f"contract): {'; '.join(dict.fromkeys(problems))}"
        )


# The deployments whose `config_uri` prefect.yaml fills from an environment variable at deploy time.
CONFIG_VARIABLES = {
    "merge-audit/nightly": "MERGEAUDIT_NIGHTLY_CONFIG",
    "merge-audit/on-checkpoint": "MERGEAUDIT_CHECKPOINT_CONFIG",
}


def resolve_config(config: AuditConfig | dict | None, config_uri: str | None) -> AuditConfig:
    """The run's audit: read from config_uri when given (the form's config is then not used),
    else the config parameter (the form's default arrives as plain data)."""
    if config_uri is None:
        if config is None:
            raise ConfigError("give `config` or `config_uri`")
        return config if isinstance(config, AuditConfig) else parse_config(config, source="config")
    if not config_uri.strip():
        variables = ", ".join(f"${v} ({d})" for d, v in CONFIG_VARIABLES.items())
        raise ConfigError(
            f"config_uri is empty: the environment variable that fills it ({variables}) was unset when the "
            "deployment was made; set it and run `prefect deploy --all` again, or give config_uri with the run"
        )
    return load_config(config_uri)


@task(name="run-evaluation", tags=["dispatch"], task_run_name="dispatch-{candidate.name}")
def dispatch_evaluation(config: AuditConfig, candidate: audit.Candidate, parent: str) -> dict:
    """Start (or, with the same idempotency key, find) the child run and wait for it, at most
    `config.child_timeout` seconds: a run still not final then is cancelled and reported as
    TIMED_OUT (a pool without a worker, a worker killed mid-evaluation)."""
    child = run_deployment(
        config.evaluate_deployment,
        parameters={
            "candidate": candidate.model_dump(mode="json"),
            "evaluation": config.evaluation.model_dump(mode="json"),
            "storage": config.storage.model_dump(mode="json"),
            "results_uri": config.results_uri,
        },
        idempotency_key=f"{parent}:{candidate.candidate_id}",
        flow_run_name=f"evaluate-{candidate.candidate_id[:12]}",
        timeout=config.child_timeout,
        poll_interval=2,
    )
    state, message = (child.state.type.value, child.state.message) if child.state else (None, None)
    if child.state is None or not child.state.is_final():
        cancel_run(child.id)
        was = child.state.name if child.state else "unknown"
        state = "TIMED_OUT"
        message = f"not finished after child_timeout={config.child_timeout:g} s (it was {was}); cancelled"
    return {
        "candidate": candidate.name,
        "candidate_id": candidate.candidate_id,
        "flow_run": str(child.id),
        "state": state,
        "message": message,
        "work_pool": child.work_pool_name,
    }


def cancel_run(flow_run_id) -> None:
    """Ask Prefect to cancel a flow run (its worker stops it; a Scheduled one never starts)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(
            flow_run_id, Cancelling(message="the audit stopped waiting (child_timeout)"), force=True
        )


def pool_readiness(deployment: str) -> str:
    """One line on whether the deployment's work pool has a worker online to run evaluations."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            dep = client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            raise ConfigError(f"evaluate_deployment {deployment!r} is not deployed (prefect deploy --all)") from None
        if not dep.work_pool_name:
            return f"{deployment} has no work pool: its runs wait until something runs them"
        workers = client.read_workers_for_work_pool(dep.work_pool_name)
    online = [w.name for w in workers if str(getattr(w.status, "value", w.status)).upper() == "ONLINE"]
    if online:
        return f"work pool {dep.work_pool_name}: {len(online)} worker(s) online ({', '.join(online[:4])})"
    return (
        f"work pool {dep.work_pool_name} has no worker online: the evaluations queue until one starts "
        f"(prefect worker start --pool {dep.work_pool_name}), at most child_timeout each"
    )


def audit_progress(config: AuditConfig) -> AuditProgress:
    """The run's one progress line: on the terminal (or the run's log) and in a progress
    artifact the UI shows while the run lasts."""
    logger = get_run_logger()
    artifact = {}

    def publish(progress: AuditProgress) -> None:
        percent = round(100 * progress.fraction, 1)
        try:
            if "id" not in artifact:
                artifact["id"] = create_progress_artifact(
                    percent, key=artifact_key(config.name, "progress"), description=progress.line()
                )
            else:
                update_progress_artifact(artifact["id"], percent, description=progress.line())
        except Exception as exc:  # noqa: BLE001 - the display never fails a run
            logger.debug("progress artifact not updated: %s", exc)

    return AuditProgress(STAGES, on_change=publish, emit=logger.info)


def evaluate_on_pool(
    config: AuditConfig, candidates: list[audit.Candidate], progress: AuditProgress | None = None
) -> list[audit.EvaluationRecord]:
    """One `evaluate` run per candidate on the GPU pool, concurrently. Every child's final
    state is checked: a child that did not complete becomes a failed record naming its flow run
    (the audit then ends Failed with one line per failed child, after writing the rest)."""
    parent = str(flow_run.get_id() or audit.new_run_id())
    ready = pool_readiness(config.evaluate_deployment)
    get_run_logger().log(30 if "no worker" in ready or "no work pool" in ready else 20, ready)
    futures = [dispatch_evaluation.submit(config, c, parent) for c in candidates]
    done = {}
    log = get_run_logger()
    for future in as_completed(futures):
        child = future.result()
        done[child["candidate_id"]] = child
        ok = child["state"] == StateType.COMPLETED.value
        log.log(
            20 if ok else 40,
            "evaluate run %s on pool %s for %s ended %s%s",
            child["flow_run"],
            child["work_pool"],
            child["candidate"],
            child["state"],
            "" if ok or not child["message"] else f": {child['message']}",
        )
        if progress is not None:
            progress.finished(child["candidate"], ok=ok)
    children = [done[c.candidate_id] for c in candidates]
    out = []
    for cand, child in zip(candidates, children):
        if child["state"] == StateType.COMPLETED.value:
            record = audit.stored_evaluation(cand, config.evaluation, config.results_uri)
            out.append(
                record.model_copy(update=reads.load_report(reads.report_uri(config.results_uri, child["flow_run"])))
            )
        else:
            out.append(
                audit.failed_evaluation(
                    cand, f"evaluate run {child['flow_run']} ended {child['state']}: {child['message'] or ''}"
                )
            )
    return out


def artifact_key(name: str, suffix: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", f"{name}-{suffix}".lower()).strip("-")


@task(name="publish-report", tags=["storage"], retries=2, retry_delay_seconds=5)
def publish_report(config: AuditConfig, outcome: audit.RunOutcome) -> str:
    """The HTML report next to the tables (RESULTS/reports/RUN.html), the same content as a
    keyed markdown artifact, and a keyed leaderboard table artifact (the run summary of
    mergeaudit.results.leaderboard): the UI shows both across nightly runs."""
    data = report.load_run(config.results_uri, outcome.run_id)
    data.regression = outcome.regressions
    content = report.build_content(data)
    uri = store.join(config.results_uri, "reports", f"{outcome.run_id}.html")
    store.write_bytes(uri, report.render_html(data, content).encode())
    create_markdown_artifact(
        report.render_markdown(data, content),
        key=artifact_key(config.name, "report"),
        description=f"merge audit {config.name}, run {outcome.run_id}; HTML: {uri}",
    )
    create_table_artifact(
        [r.model_dump() for r in outcome.summary],
        key=artifact_key(config.name, "leaderboard"),
        description=f"candidates of run {outcome.run_id}, best first",
    )
    return uri
