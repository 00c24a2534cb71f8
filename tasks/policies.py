"""Shared Prefect task policies: when to retry and how long to wait.

Only transient failures retry (network errors, S3 5xx and throttling, as decided by
`mergeaudit.store.is_transient`); a validation error fails at once.
"""

from __future__ import annotations

from prefect.tasks import exponential_backoff

from mergeaudit.store import is_transient

STORAGE_RETRIES = dict(
    retries=4,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
)


def retry_transient(task, task_run, state) -> bool:
    """Prefect retry condition: retry only when the failure is transient."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - we classify whatever the task raised
        return is_transient(exc)
    return False
