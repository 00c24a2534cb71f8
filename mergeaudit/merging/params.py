"""Merge parameters as mergekit writes them, resolved per tensor and per model.

A parameter setting is a scalar, a list of scalars (a gradient over the layers: layer i of N
takes t = i / (N - 1) and interpolates between neighbouring values; tensors outside the layers
take t = 0), or a list of `{filter, value}` conditions (the first whose filter is a substring of
the tensor name, or `*`, applies). Per-model settings take precedence over the global ones, as
in mergekit 0.1.x.

`resolve` turns settings into one frozen params object per tensor: shared fields as scalars,
per-model fields (`weight`, `density`, ...) as tuples aligned with the merged models.
`check_all` resolves every tensor of a plan before any tensor is read and reports every
problem at once; numbers must be finite and within MAX_PARAM_MAGNITUDE (registry.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union

import pydantic

from mergeaudit.errors import ConfigError
from mergeaudit.merging.registry import MAX_PARAM_MAGNITUDE, MergeMethod, MethodParams

Scalar = Union[bool, int, float, str]


class Condition(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")
    filter: str | None = None
    value: Union[Scalar, list[Scalar]]


Setting = Union[Scalar, list[Scalar], Condition, list[Condition]]
Settings = Mapping[str, Any]


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (bool, int, float, str))


def evaluate(setting: Any, tensor: str, t: float) -> Any:
    """The value of one setting for a tensor at layer position t in [0, 1] (None: no match)."""
    if isinstance(setting, Mapping):
        setting = Condition.model_validate(setting)
    if isinstance(setting, Condition):
        setting = [setting]
    if _is_scalar(setting):
        return setting
    if isinstance(setting, list):
        if not setting:
            return None
        if all(_is_scalar(v) for v in setting):
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting)
            if not numeric:
                return setting[int(t * (len(setting) - 1))]
            # checked before interpolating: a 400-digit integer would raise OverflowError
            bad = [v for v in setting if not abs(v) <= MAX_PARAM_MAGNITUDE]  # False for NaN, too
            if bad:
                shown = repr(bad[0]) if isinstance(bad[0], float) else f"an integer of {len(str(abs(bad[0])))} digits"
                raise ConfigError(
                    f"gradient value {shown} is not a finite number of magnitude at most {MAX_PARAM_MAGNITUDE:g}"
                )
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        for cond in setting:
            cond = Condition.model_validate(cond) if isinstance(cond, Mapping) else cond
            if not isinstance(cond, Condition):
                raise ConfigError(f"cannot mix scalars and filter conditions in {setting!r}")
            if cond.filter is None or cond.filter == "*" or (tensor and cond.filter in tensor):
                return evaluate(cond.value, tensor, t)
        return None
    raise ConfigError(f"unsupported parameter setting {setting!r}")


def number_problems(value: Any, where: str) -> list[str]:
    """Every number in a settings tree (scalars, gradient lists, conditions) that is not finite
    or lies beyond MAX_PARAM_MAGNITUDE, by where it is; checked before anything is resolved."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        if abs(value) <= MAX_PARAM_MAGNITUDE:  # False for NaN and infinities
            return []
        shown = repr(value) if isinstance(value, float) else f"an integer of {len(str(abs(value)))} digits"
        return [f"{where}: {shown} is not a finite number of magnitude at most {MAX_PARAM_MAGNITUDE:g}"]
    if isinstance(value, Mapping):
        return [p for k, v in value.items() for p in number_problems(v, f"{where}.{k}")]
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in number_problems(v, f"{where}[{i}]")]
    return []


def layer_position(layer: int | None, num_layers: int | None) -> float:
    """mergekit's t: i / (N - 1) for layer i of N (1 for a single layer), 0 outside layers."""
    if layer is None or not num_layers:
        return 0.0
    return layer / (num_layers - 1) if num_layers > 1 else 1.0


def resolve(
    method: MergeMethod,
    tensor: str,
    t: float,
    shared: Settings,
    per_model: Sequence[Settings],
) -> MethodParams:
    """The params of one tensor; raises pydantic.ValidationError or ConfigError."""
    spec = method.params
    per_model_fields = spec.per_model_fields()
    values: dict[str, Any] = {}
    for name in spec.model_fields:
        key = spec.model_fields[name].alias or name
        if name in per_model_fields:
            column = []
            for settings in per_model:
                v = _first(key, tensor, t, settings, shared)
                column.append(per_model_fields[name] if v is None else v)
            values[key] = tuple(column)
        else:
            v = _first(key, tensor, t, shared)
            if v is not None:
                values[key] = v
    return spec.model_validate(values)


def _first(key: str, tensor: str, t: float, *scopes: Settings) -> Any:
    for scope in scopes:
        if scope and key in scope:
            v = evaluate(scope[key], tensor, t)
            if v is not None:
                return v
    return None


def unknown_parameters(method: MergeMethod, shared: Settings, per_model: Sequence[Settings]) -> list[str]:
    """Names set in the config that the method does not take."""
    known = {(f.alias or n) for n, f in method.params.model_fields.items()}
    names = set(shared or {}) | {k for s in per_model for k in (s or {})}
    return sorted(names - known)


def input_problems(method: MergeMethod, shared: Settings, per_model: Sequence[Settings], has_base: bool) -> list[str]:
    """Settings the method does not take, and a number of models it does not merge."""
    problems = []
    unknown = unknown_parameters(method, shared, per_model)
    if unknown:
        known = sorted((f.alias or n) for n, f in method.params.model_fields.items())
        problems.append(f"{method.name} does not take {', '.join(unknown)} (it takes: {', '.join(known) or 'nothing'})")
    return problems + method.check_inputs(len(per_model), has_base)


def check_all(
    method: MergeMethod,
    tensors: Sequence[tuple[str, int | None]],
    num_layers: int | None,
    shared: Settings,
    per_model: Sequence[Settings],
    has_base: bool,
) -> dict[str, MethodParams]:
    """Resolve and validate the params of every (tensor, layer); every problem in one error."""
    problems = input_problems(method, shared, per_model, has_base)
    resolved: dict[str, MethodParams] = {}
    seen: dict[str, list[str]] = {}  # problem (without its "(got ...)" values) -> tensors
    first: dict[str, str] = {}

    def note(msg: str, tensor: str) -> None:
        key = msg.split(" (got ")[0]
        first.setdefault(key, msg)
        seen.setdefault(key, []).append(tensor)

    if not problems:
        for tensor, layer in tensors:
            try:
                p = resolve(method, tensor, layer_position(layer, num_layers), shared, per_model)
                for msg in p.check(len(per_model)) + p.check_base(has_base):
                    note(msg, tensor)
                resolved[tensor] = p
            except pydantic.ValidationError as exc:
                for e in exc.errors():
                    where = ".".join(str(x) for x in e["loc"])
                    note(f"{where}: {str(e['msg']).removeprefix('Value error, ')}", tensor)
            except ConfigError as exc:
                note(str(exc), tensor)
    for key, names in seen.items():
        where = names[0] if len(names) == 1 else f"{names[0]} and {len(names) - 1} more tensors"
        problems.append(f"{first[key]} (at {where})")
    if problems:
        raise ConfigError(f"invalid {method.name} merge: " + "; ".join(problems))
    return resolved


def filters(setting: Any) -> set[str]:
    """The tensor-name filters of a settings tree's conditions."""
    if isinstance(setting, Mapping) and "value" in setting:  # a condition
        found = {str(setting["filter"])} if setting.get("filter") not in (None, "*") else set()
        return found | filters(setting["value"])
    if isinstance(setting, Mapping):  # settings by name
        return {f for v in setting.values() for f in filters(v)}
    if isinstance(setting, Condition):
        return filters(setting.model_dump())
    if isinstance(setting, (list, tuple)):
        return {f for v in setting for f in filters(v)}
    return set()


def check_settings(
    method: MergeMethod, shared: Settings, per_model: Sequence[Settings], has_base: bool
) -> list[MethodParams]:
    """Validate a merge's settings before any checkpoint is opened: the names the method takes,
    how many models, and the values at the first and last layer of a tensor matched by each
    condition's filter alone, and of one matched by none. A real name can match several filters
    at once: `check_all` checks the real names when the headers are read (the audit's
    preflight). Every problem in one ConfigError."""
    problems = input_problems(method, shared, per_model, has_base)
    resolved: list[MethodParams] = []
    names = [""] + sorted(filters([dict(shared or {})] + [dict(s or {}) for s in per_model]))
    for name in [] if problems else names:
        for t, layer in ((0.0, "first"), (1.0, "last")):
            where = f"{layer} layer, tensors matching {name!r}" if name else f"{layer} layer"
            try:
                p = resolve(method, name, t, shared, per_model)
                problems += [f"{msg} (at the {where})" for msg in p.check(len(per_model)) + p.check_base(has_base)]
                resolved.append(p)
            except pydantic.ValidationError as exc:
                problems += [
                    f"{'.'.join(str(x) for x in e['loc'])}: {str(e['msg']).removeprefix('Value error, ')}"
                    f" (at the {where})"
                    for e in exc.errors()
                ]
            except ConfigError as exc:
                problems.append(str(exc))
    if problems:
        raise ConfigError(f"invalid {method.name} merge: " + "; ".join(dict.fromkeys(problems)))
    return resolved
