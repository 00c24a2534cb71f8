"""Shared Prefect task policies: when to retry, how long to wait, and what a cache key is.

Only transient failures retry (network errors, S3 5xx and throttling, as decided by
`mergeaudit.store.is_transient`); a validation error fails at once. Cache keys are built from
the inputs' fingerprints, the parameters and the code version, so a rerun after a crash skips
work that finished; cached results are persisted to Prefect's result storage (local by
default; point PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK at shared storage for several workers).
Results that live in the results store (Fisher checkpoints, evaluations) are memoised there,
under the same kind of key, instead.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from prefect.tasks import exponential_backoff

import mergeaudit
from mergeaudit.store import is_transient

STORAGE_RETRIES = dict(
    retries=4,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
)
CACHED = dict(persist_result=True)


def retry_transient(task, task_run, state) -> bool:
    """Prefect retry condition: retry only when the failure is transient."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - we classify whatever the task raised
        return is_transient(exc)
    return False


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:32]


def geometry_key(context, parameters: dict) -> str:
    config, records = parameters["config"], parameters["records"]
    return "geometry-" + _digest(
        {
            "fingerprints": {n: r.fingerprint for n, r in records.items()},
            "kinds": {m.name: m.kind for m in config.models},
            "geometry": config.geometry.model_dump(mode="json"),
            "series": [s.model_dump(mode="json", include={"name", "kind", "compare_with"}) for s in config.series],
            "fisher": parameters.get("fisher_uris") or {},
            "version": mergeaudit.__version__,
        }
    )
