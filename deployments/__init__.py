"""Work-pool templates and the set-up helper for running mergeaudit on a Prefect server.

This folder is installed as `mergeaudit.deployments` (see setup.py):
`python -m mergeaudit.deployments.setup --gpu-slots N`.
"""
