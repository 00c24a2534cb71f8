"""The merge audit's Prefect tasks; the flow in flows/merge_audit.py chains them."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from mergeaudit import audit
from tasks.policies import STORAGE_RETRIES, retry_transient

resolve_checkpoints = task(
    audit.resolve_checkpoints, name="resolve-checkpoints", tags=["storage"], timeout_seconds=600,
    retry_condition_fn=retry_transient, cache_policy=NO_CACHE, **STORAGE_RETRIES,
)
compute_geometry = task(
    audit.compute_geometry, name="compute-geometry", tags=["storage", "cpu"], timeout_seconds=6 * 3600,
    retry_condition_fn=retry_transient, cache_policy=NO_CACHE, **STORAGE_RETRIES,
)
estimate_fisher = task(
    audit.estimate_fisher, name="estimate-fisher", tags=["storage"], timeout_seconds=6 * 3600,
    retry_condition_fn=retry_transient, cache_policy=NO_CACHE, task_run_name="fisher-{name}", **STORAGE_RETRIES,
)
plan_candidates = task(audit.plan_candidates, name="plan-candidates", cache_policy=NO_CACHE)
evaluate_candidate = task(
    audit.evaluate_candidate, name="evaluate-candidate", tags=["gpu"], timeout_seconds=6 * 3600,
    retry_condition_fn=retry_transient, cache_policy=NO_CACHE, **STORAGE_RETRIES,
    task_run_name="evaluate-{candidate.name}",
)
write_results = task(
    audit.write_results, name="write-results", tags=["storage"], timeout_seconds=600,
    retry_condition_fn=retry_transient, cache_policy=NO_CACHE, **STORAGE_RETRIES,
)
