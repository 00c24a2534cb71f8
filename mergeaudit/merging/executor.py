"""Streaming merge executor: one tensor slot at a time, fp32 compute, output in a chosen dtype.

Memory holds the base tensor and one tensor per model for the current slot, never a model.

    for name, tensor in merge_stream("task_arithmetic", params, base, [ck_a, ck_b]):
        ...
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from mergeaudit.checkpoint import Checkpoint, check_compatible, iter_aligned
from mergeaudit.merging.registry import REGISTRY, MethodParams, TensorSlot


def merge_stream(
    method: str,
    params: MethodParams,
    base: Checkpoint | None,
    models: Sequence[Checkpoint],
    out_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, merged tensor) for every tensor of the reference checkpoint, in file order.

    Names and shapes are checked across all checkpoints before the first tensor is read.
    The output dtype defaults to the reference checkpoint's stored dtype per tensor.
    """
    fn = REGISTRY.get(method).fn
    ref = base if base is not None else models[0]
    check_compatible(ref, [m for m in models if m is not ref])
    sources = ([base] if base is not None else []) + list(models)
    for name, tensors in iter_aligned(sources, ref.keys()):
        tensors = [t.to(compute_dtype) for t in tensors]
        b = tensors.pop(0) if base is not None else None
        merged = fn(TensorSlot(name, b, tuple(tensors)), params)
        yield name, merged.to(out_dtype or ref.spec(name).torch_dtype)
