"""Merge methods: one pure function per method over one TensorSlot, registered by name.

Semantics follow mergekit 0.1.x for the methods it has (`linear`, `task_arithmetic`), so a
mergekit config means the same thing here. Inputs arrive in fp32; the executor casts back.
"""

from __future__ import annotations

import pydantic
import torch

from mergeaudit.merging.registry import MethodParams, TensorSlot, register


class WeightedParams(MethodParams):
    """Per-model weights (default: equal) aligned with the order of the merged models."""

    weights: tuple[float, ...] | None = None

    def check(self, n_models: int) -> list[str]:
        if self.weights is not None and len(self.weights) != n_models:
            return [f"weights has {len(self.weights)} entries for {n_models} models"]
        return []

    def resolved_weights(self, n_models: int) -> list[float]:
        return list(self.weights) if self.weights is not None else [1.0] * n_models


class LinearParams(WeightedParams):
    normalize: bool = True

    def check(self, n_models: int) -> list[str]:
        problems = super().check(n_models)
        if self.normalize and self.weights is not None and sum(self.weights) == 0:
            problems.append("weights sum to 0, so they cannot be normalised")
        return problems


class TaskArithmeticParams(WeightedParams):
    lambda_: float = pydantic.Field(1.0, alias="lambda")
    normalize: bool = False

    def check(self, n_models: int) -> list[str]:
        problems = super().check(n_models)
        if self.normalize and self.weights is not None and sum(self.weights) == 0:
            problems.append("weights sum to 0, so they cannot be normalised")
        return problems


def weighted_sum(tensors: list[torch.Tensor], weights: list[float], normalize: bool) -> torch.Tensor:
    out = torch.zeros_like(tensors[0])
    for t, w in zip(tensors, weights):
        out.add_(t, alpha=w)
    if normalize:
        out.div_(sum(weights))
    return out


@register("linear", params=LinearParams, needs_base=False,
          reference="https://arxiv.org/abs/2203.05482")
def linear(slot: TensorSlot, p: LinearParams) -> torch.Tensor:
    """Model soup: the (normalised) weighted average of the models' weights."""
    return weighted_sum(list(slot.models), p.resolved_weights(len(slot.models)), p.normalize)


@register("task_arithmetic", params=TaskArithmeticParams, needs_base=True,
          reference="https://arxiv.org/abs/2212.04089")
def task_arithmetic(slot: TensorSlot, p: TaskArithmeticParams) -> torch.Tensor:
    """base + lambda * sum_i w_i * (model_i - base), optionally divided by sum_i w_i."""
    deltas = slot.deltas()
    merged = weighted_sum(deltas, p.resolved_weights(len(deltas)), p.normalize)
    return slot.base + p.lambda_ * merged
