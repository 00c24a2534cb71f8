"""The merge-method registry: pure functions over one tensor slot, with frozen params models.

A method is registered once by name (the same snake_case string as mergekit's `merge_method`,
the AuditConfig value and the `method` column), with its paper link. The registry refuses
duplicate names, names unknown methods together with the known ones, and validates parameters
(all problems at once) before any tensor is read.

    @register("linear", reference="https://arxiv.org/abs/2203.05482", params=LinearParams)
    def linear(slot: TensorSlot, p: LinearParams) -> torch.Tensor: ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pydantic
import torch

from mergeaudit.errors import ConfigError, UnknownMethodError


class MethodParams(pydantic.BaseModel):
    """Base of every method's parameters: frozen, unknown keys refused."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    def check(self, n_models: int) -> list[str]:
        """Problems that depend on how many models are merged (empty when fine)."""
        return []


@dataclass(frozen=True)
class TensorSlot:
    """One tensor position across the checkpoints being merged, in fp32 compute dtype."""

    name: str
    base: torch.Tensor | None
    models: tuple[torch.Tensor, ...]

    def deltas(self) -> list[torch.Tensor]:
        if self.base is None:
            raise ConfigError(f"{self.name}: this method needs a base model")
        return [m - self.base for m in self.models]


MergeFn = Callable[[TensorSlot, MethodParams], torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: MergeFn
    params: type[MethodParams]
    reference: str
    needs_base: bool
    symmetric: bool
    stochastic: bool = False


class Registry:
    """Name -> MergeMethod, loud on duplicates and unknown names."""

    def __init__(self) -> None:
        self._methods: dict[str, MergeMethod] = {}

    def register(self, name: str, *, params: type[MethodParams], reference: str, needs_base: bool,
                 symmetric: bool = True, stochastic: bool = False) -> Callable[[MergeFn], MergeFn]:
        def deco(fn: MergeFn) -> MergeFn:
            if name in self._methods:
                raise ValueError(f"merge method {name!r} is already registered")
            self._methods[name] = MergeMethod(name, fn, params, reference, needs_base, symmetric, stochastic)
            return fn

        return deco

    def names(self) -> list[str]:
        return sorted(self._methods)

    def get(self, name: str) -> MergeMethod:
        try:
            return self._methods[name]
        except KeyError:
            raise UnknownMethodError(
                f"unknown merge method {name!r}; known methods: {', '.join(self.names())}"
            ) from None

    def parse_params(self, name: str, raw: dict, n_models: int, has_base: bool) -> MethodParams:
        """Validate a method's parameters for n models; every problem in one ConfigError."""
        method = self.get(name)
        problems: list[str] = []
        if method.needs_base and not has_base:
            problems.append(f"{name} needs a base model")
        try:
            params = method.params.model_validate(raw)
        except pydantic.ValidationError as exc:
            problems += [f"{'.'.join(map(str, e['loc'])) or 'params'}: {e['msg']}" for e in exc.errors()]
            params = None
        if params is not None:
            problems += params.check(n_models)
        if problems:
            raise ConfigError(f"invalid parameters for {name}: " + "; ".join(problems))
        return params


REGISTRY = Registry()
register = REGISTRY.register
