"""The merge audit's Prefect tasks: one-line wrappers whose decorators carry retries (transient
failures only), timeouts, cache keys and tags. flows/merge_audit.py chains them."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency

from mergeaudit import audit
from mergeaudit.audit import Candidate, EvaluationRecord
from mergeaudit.checkpoint.settings import StorageSettings
from mergeaudit.evaluation.settings import EvalSettings
from mergeaudit.tasks.policies import CACHED, STORAGE_RETRIES, geometry_key, retry_transient

GPU_LIMIT = "gpu"  # a global concurrency limit: `prefect gcl create gpu --limit <GPUs>`
# A held slot is a lease its holder renews; a holder that dies stops renewing, and the slot
# returns after this many seconds (Prefect's default, 300 s, stalled every other audit that long).
GPU_LEASE_SECONDS = 60

preflight = task(
    audit.preflight,
    name="preflight",
    tags=["storage"],
    timeout_seconds=600,
    retry_condition_fn=retry_transient,
    cache_policy=NO_CACHE,
    **STORAGE_RETRIES,
)
compute_geometry = task(
    audit.compute_geometry,
    name="compute-geometry",
    tags=["storage", "cpu"],
    timeout_seconds=6 * 3600,
    retry_condition_fn=retry_transient,
    cache_key_fn=geometry_key,
    **CACHED,
    **STORAGE_RETRIES,
)
# Fisher checkpoints and evaluations are memoised in the results store itself, keyed by input
# fingerprints, settings and code version (mergeaudit.fisher / audit.evaluate_to_store): the
# stored result is the cache, so a key can never point at data that is gone.
estimate_fisher = task(
    audit.estimate_fisher,
    name="estimate-fisher",
    tags=["storage"],
    timeout_seconds=6 * 3600,
    retry_condition_fn=retry_transient,
    cache_policy=NO_CACHE,
    task_run_name="fisher-{name}",
    **STORAGE_RETRIES,
)
plan_candidates = task(
    audit.plan_candidates,
    name="plan-candidates",
    cache_policy=NO_CACHE,
    retry_condition_fn=retry_transient,
    **STORAGE_RETRIES,
)
finish_run = task(
    audit.finish_run,
    name="write-results",
    tags=["storage"],
    timeout_seconds=1800,
    retry_condition_fn=retry_transient,
    cache_policy=NO_CACHE,
    **STORAGE_RETRIES,
)


@task(
    name="evaluate-candidate",
    tags=["gpu"],
    timeout_seconds=6 * 3600,
    retry_condition_fn=retry_transient,
    cache_policy=NO_CACHE,
    task_run_name="evaluate-{candidate.name}",
    **STORAGE_RETRIES,
)
def evaluate_candidate(
    candidate: Candidate, evaluation: EvalSettings, storage: StorageSettings, results_uri: str
) -> EvaluationRecord:
    """Score one candidate; on a GPU (`evaluation.device` cuda) while holding a slot of the global
    `gpu` concurrency limit, leased for GPU_LEASE_SECONDS at a time, so a killed worker's slot
    returns within a minute. CPU evaluations take no slot: they hold no GPU, and asking the API
    for a limit that does not exist costs about 2 s per candidate (measured with Prefect 3)."""
    if not evaluation.device.startswith("cuda"):
        return audit.evaluate_to_store(candidate, evaluation, storage, results_uri)
    with concurrency(GPU_LIMIT, occupy=1, strict=False, lease_duration=GPU_LEASE_SECONDS):
        return audit.evaluate_to_store(candidate, evaluation, storage, results_uri)
