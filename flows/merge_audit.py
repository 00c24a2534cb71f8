"""The merge audit flow: resolve checkpoints -> geometry -> Fisher -> plan -> evaluate -> tables.

Run it on embedded defaults (no server: Prefect starts an ephemeral API in-process):
    mergeaudit audit audit.yaml
or from Python:
    from flows.merge_audit import merge_audit
    merge_audit(load_config("audit.yaml"))
"""

from __future__ import annotations

import datetime as dt

from prefect import flow, get_run_logger

from flows.credentials import use_storage_credentials
from mergeaudit import audit
from mergeaudit.config import AuditConfig
from tasks.audit import (
    compute_geometry,
    estimate_fisher,
    evaluate_candidate,
    plan_candidates,
    resolve_checkpoints,
    write_results,
)


@flow(name="merge-audit", log_prints=True)
def merge_audit(config: AuditConfig) -> dict:
    """Audit merges of the configured checkpoints; returns the run id, table URIs and a summary."""
    log = get_run_logger()
    run_id = audit.new_run_id()
    started_at = dt.datetime.now(dt.timezone.utc)
    use_storage_credentials(config.storage)
    records = resolve_checkpoints(config)
    geometry = compute_geometry(config, records)
    fisher_uris = {name: estimate_fisher(config, records, name) for name in audit.fisher_models(config)}
    candidates = plan_candidates(config, records, fisher_uris)
    results = [evaluate_candidate(c, config.evaluation, config.storage) for c in candidates]
    files = write_results(config, run_id, started_at, geometry, candidates, results)
    log.info("run %s wrote %s", run_id, ", ".join(files))
    return {
        "run_id": run_id,
        "results_uri": config.results_uri,
        "tables": files,
        "summary": audit.summary_rows(config, candidates, results),
    }
