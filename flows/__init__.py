"""Prefect flows: they orchestrate mergeaudit library functions and hold no computation."""
