"""Merging: a registry of pure per-tensor methods, mergekit-compatible parameters and YAML,
and a streaming executor.

    from mergeaudit.merging import MergePlan, run_merge
    plan = MergePlan.from_mergekit_yaml("ties.yaml")
"""

from mergeaudit.merging import methods as _methods  # noqa: F401 - registers the methods
from mergeaudit.merging.registry import REGISTRY, MergeMethod, MethodParams, TensorSlot

__all__ = ["REGISTRY", "MergeMethod", "MethodParams", "TensorSlot"]
