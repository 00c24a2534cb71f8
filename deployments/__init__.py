"""Work-pool templates and the set-up helper for running mergeaudit on a Prefect server."""
