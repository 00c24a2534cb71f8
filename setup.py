"""Which packages the distribution installs; everything else is declared in pyproject.toml.

The orchestration layer lives in the top-level folders flows/, tasks/ and deployments/ (the
project's shape; prefect.yaml names their files) but is installed as `mergeaudit.flows`,
`mergeaudit.tasks` and `mergeaudit.deployments`, never as generic top-level packages. pyproject
cannot combine a package search with such a mapping, so the list is computed here: every package
under mergeaudit/ (data folders included, as namespace packages) plus the three mapped folders.
"""

from setuptools import find_namespace_packages, setup

ORCHESTRATION = ("flows", "tasks", "deployments")

setup(
    packages=find_namespace_packages(include=["mergeaudit*"]) + [f"mergeaudit.{d}" for d in ORCHESTRATION],
    package_dir={"": ".", **{f"mergeaudit.{d}": d for d in ORCHESTRATION}},
)
