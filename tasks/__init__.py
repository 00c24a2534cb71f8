"""Prefect tasks: one-line wrappers over mergeaudit library functions.

Each decorator carries what orchestration adds (retries for transient storage failures,
timeouts, tags); the work itself is a library call that can run in a REPL without Prefect.
This folder is installed as `mergeaudit.tasks` (see setup.py).
"""
