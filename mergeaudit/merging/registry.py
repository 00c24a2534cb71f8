"""The merge-method registry: pure functions over one tensor slot, with frozen params models.

A method is registered once by name (the same snake_case string as mergekit's `merge_method`,
the AuditConfig value and the `method` column), with its paper link and its input contract.
The registry refuses duplicate names and names unknown methods together with the known ones.

    @register("linear", params=LinearParams, reference="https://arxiv.org/abs/2203.05482")
    def linear(slot: TensorSlot, p: LinearParams) -> torch.Tensor: ...

Adding a method is one file under `merging/methods/` (every module there is imported, and its
`@register` calls are the registration) plus its tests; the conformance tests read each method's
arity and `example` parameters from here, and `mergeaudit methods` lists names and references.

Params models are frozen pydantic models (`extra="forbid"`). Fields listed in `PER_MODEL`
hold one value per merged model (a tuple aligned with `slot.models`); the others are shared.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import pydantic
import torch

from mergeaudit.errors import ConfigError, UnknownMethodError

Semantics = Literal["mergekit", "paper"]
# Every numeric merge parameter (weights, densities, lambda, t, ...) lies within +-1e6: real
# configs use values near 1, and beyond this a merge is an overflow, not an experiment.
MAX_PARAM_MAGNITUDE = 1e6


class MethodParams(pydantic.BaseModel):
    """Base of every method's parameters: frozen, unknown keys refused, numbers finite and
    within MAX_PARAM_MAGNITUDE (a NaN, infinite or 1e308 weight would merge into NaNs)."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid", populate_by_name=True, allow_inf_nan=False)
    PER_MODEL: ClassVar[dict[str, Any]] = {}  # field name -> default for a model without a value

    @pydantic.field_validator("*", mode="after")
    @classmethod
    def _bounded(cls, v: Any) -> Any:
        values = v if isinstance(v, tuple) else (v,)
        bad = [
            x
            for x in values
            if isinstance(x, (int, float)) and not isinstance(x, bool) and not abs(x) <= MAX_PARAM_MAGNITUDE
        ]  # False for NaN and infinities too
        if bad:
            raise ValueError(f"{bad[0]!r} is not a finite number of magnitude at most {MAX_PARAM_MAGNITUDE:g}")
        return v

    @classmethod
    def per_model_fields(cls) -> dict[str, Any]:
        return dict(cls.PER_MODEL)

    def check(self, n_models: int) -> list[str]:
        """Problems that depend on how many models are merged (empty when fine)."""
        return []

    def check_base(self, has_base: bool) -> list[str]:
        """Problems with these params given whether the plan names a base (empty when fine)."""
        return []

    def uses_fisher(self) -> bool:
        """True when the method needs each model's diagonal Fisher (slot.fisher)."""
        return False


@dataclass(frozen=True)
class TensorSlot:
    """One tensor position across the checkpoints being merged, in the compute dtype.

    `model_ids` name the models in messages. `random_keys` key the randomness: model i's
    generator is keyed by (seed, tensor name, random_keys[i]), so any tensor's mask can be
    regenerated alone and does not depend on processing order or device. The executor passes
    each checkpoint's fingerprint (its files' names, sizes and ETags or mtimes), so the same
    checkpoint reached by another spelling of its path (`./a`, `/abs/a`, `a/`) or another id
    draws the same masks, a changed checkpoint draws new ones, and one checkpoint listed twice
    draws the same mask twice. Without `random_keys` (tests, REPL use) `model_ids` key it, and
    without either the position does. `fisher` holds each model's diagonal Fisher for
    this tensor when the method uses it. Methods record what they computed in `info`. The
    base is in the compute dtype; models may be in their stored dtype (read them through
    `inputs()` or `deltas()`), so a bf16 model costs no fp32 copy until it is used.
    """

    name: str
    base: torch.Tensor | None
    models: tuple[torch.Tensor, ...]
    model_ids: tuple[str, ...] = ()
    fisher: tuple[torch.Tensor, ...] | None = None
    seed: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    dtype: torch.dtype | None = None  # compute dtype; models may arrive in their stored dtype
    random_keys: tuple[str, ...] = ()  # per model; default model_ids

    @property
    def compute_dtype(self) -> torch.dtype:
        if self.dtype is not None:
            return self.dtype
        return self.base.dtype if self.base is not None else self.models[0].dtype

    def inputs(self) -> list[torch.Tensor]:
        """The models in the compute dtype (no copy when they already are)."""
        return [m.to(self.compute_dtype) for m in self.models]

    def deltas(self) -> list[torch.Tensor]:
        """Fresh task vectors model - base in the compute dtype (methods may modify them)."""
        if self.base is None:
            raise ConfigError(f"{self.name}: this method needs a base model")
        return [m.to(self.compute_dtype, copy=True).sub_(self.base) for m in self.models]

    def generator(self, i: int) -> torch.Generator:
        """A CPU generator keyed by (seed, tensor name, model i's random key)."""
        keys = self.random_keys or self.model_ids
        key = keys[i] if i < len(keys) else str(i)
        digest = hashlib.sha256(f"{self.seed}\0{self.name}\0{key}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


MergeFn = Callable[[TensorSlot, MethodParams], torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: MergeFn
    params: type[MethodParams]
    reference: str
    base: Literal["required", "optional", "none"]
    min_models: int = 1
    max_models: int | None = None
    symmetric: bool = True
    stochastic: bool = False
    needs_fisher: bool = False
    example: dict[str, Any] = field(default_factory=dict)  # global params a run needs (conformance tests)

    @property
    def example_models(self) -> int:
        """How many models an example merge takes: the fixed arity, else 3 within the bounds."""
        if self.max_models is not None and self.max_models == self.min_models:
            return self.min_models
        return max(self.min_models, min(3, self.max_models or 3))

    def check_inputs(self, n_models: int, has_base: bool) -> list[str]:
        problems = []
        if self.base == "required" and not has_base:
            problems.append(f"{self.name} needs a base model")
        if n_models < self.min_models or (self.max_models is not None and n_models > self.max_models):
            want = (
                f"exactly {self.min_models}"
                if self.max_models == self.min_models
                else f"at least {self.min_models}"
                if self.max_models is None
                else f"{self.min_models} to {self.max_models}"
            )
            problems.append(f"{self.name} merges {want} models besides the base, not {n_models}")
        return problems


class Registry:
    """Name -> MergeMethod, loud on duplicates and unknown names."""

    def __init__(self) -> None:
        self._methods: dict[str, MergeMethod] = {}

    def register(
        self,
        name: str,
        *,
        params: type[MethodParams],
        reference: str,
        base: Literal["required", "optional", "none"] = "required",
        min_models: int = 1,
        max_models: int | None = None,
        symmetric: bool = True,
        stochastic: bool = False,
        needs_fisher: bool = False,
        example: dict[str, Any] | None = None,
    ) -> Callable[[MergeFn], MergeFn]:
        """Register `fn` under `name`. `reference` is the method's paper (or, for mergekit's own
        methods without one, mergekit's documentation); `example` holds the global parameters
        an example merge needs (for the conformance tests; its models come from the arity)."""
        if not reference.startswith("https://"):
            raise ValueError(f"merge method {name!r}: reference must be a https:// link, not {reference!r}")

        def deco(fn: MergeFn) -> MergeFn:
            if name in self._methods:
                raise ValueError(f"merge method {name!r} is already registered")
            self._methods[name] = MergeMethod(
                name,
                fn,
                params,
                reference,
                base,
                min_models,
                max_models,
                symmetric,
                stochastic,
                needs_fisher,
                dict(example or {}),
            )
            return fn

        return deco

    def names(self) -> list[str]:
        return sorted(self._methods)

    def methods(self) -> list[MergeMethod]:
        return [self._methods[n] for n in self.names()]

    def get(self, name: str) -> MergeMethod:
        try:
            return self._methods[name]
        except KeyError:
            raise UnknownMethodError(
                f"unknown merge method {name!r}; known methods: {', '.join(self.names())}"
            ) from None


REGISTRY = Registry()
register = REGISTRY.register
