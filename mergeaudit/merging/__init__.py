"""Merging: a registry of pure per-tensor methods and a streaming executor.

    from mergeaudit.merging import REGISTRY, merge_stream
    params = REGISTRY.parse_params("task_arithmetic", {"lambda": 0.8}, n_models=2, has_base=True)
"""

from mergeaudit.merging import methods as _methods  # noqa: F401 - registers the methods
from mergeaudit.merging.executor import merge_stream
from mergeaudit.merging.registry import REGISTRY, MergeMethod, MethodParams, TensorSlot

__all__ = ["REGISTRY", "MergeMethod", "MethodParams", "TensorSlot", "merge_stream"]
