"""Typed configuration: AuditConfig is both the Prefect flow parameter and the YAML file.

It composes the subsystems' own settings models (each defined beside the code that uses it,
which takes it as is: no adapters): `evaluation` (mergeaudit.evaluation.settings), `geometry`
(mergeaudit.geometry.settings), `fisher` (mergeaudit.fisher), `storage`
(mergeaudit.checkpoint.settings), `series` (mergeaudit.geometry.series), `probes`
(mergeaudit.probes) and `alarm` (mergeaudit.results.alarm). This file holds what is the audit's
own: the checkpoints, the strategies, and the checks across sections.

YAML is data: it loads with a bounded SafeLoader (`mergeaudit.safe_yaml`: no tags, no alias
bombs) into frozen pydantic models that refuse unknown keys. Validation happens before any
tensor is read and reports every problem at once: unknown store schemes, duplicate checkpoint
names, strategies naming unknown models or methods, bad or non-finite method parameters, grids
beyond `max_grid_points`, results written inside a checkpoint folder, unknown tasks. What needs
the checkpoints' headers (each tensor's parameters, shapes) is checked by
`mergeaudit.audit.preflight`, before any tensor is read.

    config = load_config("audit.yaml")
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from pathlib import Path
from typing import Any, Literal

import pydantic

from mergeaudit import store
from mergeaudit.checkpoint.settings import StorageSettings
from mergeaudit.errors import ConfigError, MergeAuditError
from mergeaudit.evaluation.settings import EvalSettings
from mergeaudit.fields import Name, StoreURI
from mergeaudit.fisher import FisherSettings
from mergeaudit.frozen import Frozen
from mergeaudit.geometry.series import SeriesSpec
from mergeaudit.geometry.settings import GeometrySettings
from mergeaudit.probes import ProbeSettings
from mergeaudit.results.alarm import AlarmSettings
from mergeaudit.safe_yaml import load_yaml

log = logging.getLogger(__name__)


class CheckpointSpec(Frozen):
    """One checkpoint by a short name, where it lives, and how it was trained."""

    name: Name = pydantic.Field(description="Short unique name used in tables and reports.")
    uri: StoreURI = pydantic.Field(description="Folder of the HF checkpoint: path, file://, s3:// or memory://.")
    kind: Literal["rlvr", "sft", "base", "unknown"] = pydantic.Field(
        "unknown", description="How the checkpoint was trained, for the report's contrasts."
    )


class StrategySpec(Frozen):
    """A merge method over some of the models, with mergekit-style parameters and a grid.

    `params` are global settings exactly as in a mergekit config (scalars, per-layer gradient
    lists, `{filter, value}` conditions); `model_params` holds per-model settings by name
    (`weight`, `density`, ...); `grid` sweeps global settings, one candidate per point.
    """

    method: str = pydantic.Field(
        description="Registry name, as in mergekit (linear, ties, dare_ties, sar, ...).",
        json_schema_extra=lambda schema: schema.update(enum=_method_names()),
    )
    models: list[str] | None = pydantic.Field(
        None, description="Names of the fine-tuned checkpoints to merge; default: all of them."
    )
    params: dict[str, Any] = pydantic.Field(
        default_factory=dict,
        description='Global method parameters, as in mergekit, e.g. {"lambda": 1.0, "density": 0.3}; a value may be '
        'a per-layer gradient list [0.2, 0.8] or conditions [{"filter": "mlp", "value": 0.5}, {"value": 0.3}].',
        examples=[{"lambda": 1.0, "density": 0.3}, {"density": [{"filter": "mlp", "value": 0.5}, {"value": 0.3}]}],
    )
    model_params: dict[str, dict[str, Any]] = pydantic.Field(
        default_factory=dict,
        description='Per-model parameters by model name, e.g. {"rl_math": {"weight": 0.7}, "rl_code": {"weight": 0.3}}',
        examples=[{"rl_math": {"weight": 0.7, "density": 0.5}, "rl_code": {"weight": 0.3, "density": 0.5}}],
    )
    grid: dict[str, list[Any]] = pydantic.Field(
        default_factory=dict,
        description='Parameters to sweep, one candidate per point of the product, e.g. {"density": [0.3, 0.7], '
        '"lambda": [0.5, 1.0]} (4 candidates).',
        examples=[{"density": [0.3, 0.7], "lambda": [0.5, 1.0]}],
    )
    seed: int = pydantic.Field(0, description="Seed of the random masks (DARE, DELLA).")
    out_dtype: Literal["bfloat16", "float16", "float32"] | None = pydantic.Field(
        None, description="dtype the merged weights are rounded to (default: the base's, as a saved merge would be)."
    )

    def grid_size(self) -> int:
        """How many candidates the grid makes (computed without expanding it)."""
        return math.prod(len(v) for v in self.grid.values())

    def points(self) -> list[dict[str, Any]]:
        """The params of every grid point (fixed params overridden by the grid's values);
        AuditConfig refuses grids beyond its `max_grid_points` before anything expands one."""
        keys = sorted(self.grid)
        return [{**self.params, **dict(zip(keys, combo))} for combo in itertools.product(*(self.grid[k] for k in keys))]

    def uses_fisher(self, models: list[str]) -> bool:
        """Whether some grid point needs the models' Fisher; checks every point's settings
        (without headers: `merging.params.check_settings`) and raises ConfigError on the first
        bad one."""
        from mergeaudit.merging import REGISTRY
        from mergeaudit.merging.params import check_settings

        method = REGISTRY.get(self.method)
        per_model = [self.model_params.get(n, {}) for n in models]
        return any(
            p.uses_fisher() for point in self.points() for p in check_settings(method, point, per_model, has_base=True)
        )


class AuditConfig(Frozen):
    """One merge audit: a base, fine-tuned checkpoints, merge strategies, evaluation, results."""

    name: Name = pydantic.Field("merge-audit", description="Audit name; runs of one name are compared.")
    base: CheckpointSpec = pydantic.Field(description="The checkpoint the fine-tunes started from.")
    models: list[CheckpointSpec] = pydantic.Field(min_length=1, description="Fine-tuned checkpoints.")
    strategies: list[StrategySpec] = pydantic.Field(
        default_factory=list, description="Merge methods to try; each grid point is one candidate."
    )
    evaluation: EvalSettings = pydantic.Field(
        default_factory=EvalSettings, description="How candidates are scored (tasks, prompting, sampling, device)."
    )
    results_uri: StoreURI = pydantic.Field(description="Where the Parquet tables go (path, file://, s3://).")
    storage: StorageSettings = pydantic.Field(
        default_factory=StorageSettings, description="How checkpoints are read (S3 endpoint, credentials, cache)."
    )
    geometry: GeometrySettings = pydantic.Field(
        default_factory=GeometrySettings, description="Task-vector geometry (thresholds, spectral figures)."
    )
    fisher: FisherSettings | None = pydantic.Field(None, description="Needed by the fisher and sar methods.")
    probes: ProbeSettings = pydantic.Field(default_factory=ProbeSettings, description="Fragility probes.")
    series: list[SeriesSpec] = pydantic.Field(
        default_factory=list, description="Training runs measured step by step (geometry only)."
    )
    alarm: AlarmSettings = pydantic.Field(default_factory=AlarmSettings, description="Regression alarm.")
    routing: Literal["inline", "pools"] = pydantic.Field(
        "inline", description="inline: everything in this process; pools: evaluations as runs of evaluate_deployment."
    )
    evaluate_deployment: str = pydantic.Field("evaluate/gpu", description="Deployment that evaluates one candidate.")
    child_timeout: float = pydantic.Field(
        6 * 3600.0,
        gt=0,
        description="routing: pools: seconds the audit waits for one evaluate run, queueing included; a run not "
        "finished by then is cancelled and its candidate fails (no worker on the pool, a worker killed mid-run).",
    )
    score_inputs: bool = pydantic.Field(True, description="Also score the base and each fine-tune as references.")
    max_grid_points: int = pydantic.Field(
        4096,
        ge=1,
        le=1_000_000,
        description="Most candidates all strategies' grids may make together (each is a merge and an evaluation).",
    )
    landed_same_name: Literal["replace", "refuse"] = pydantic.Field(
        "replace",
        description="A landed checkpoint (add_models) named like a model of this config: replace that model "
        "(audit the new checkpoint in its place), or refuse the run with a message naming both.",
    )

    @pydantic.model_validator(mode="before")
    @classmethod
    def _device_by_routing(cls, data: Any) -> Any:
        """`evaluation.device: auto` (the default) is cuda with routing: pools, where evaluations run
        on the GPU pool, and cpu inline."""
        if not isinstance(data, dict) or data.get("routing", "inline") != "pools":
            return data
        evaluation = data.get("evaluation")
        if evaluation is None or isinstance(evaluation, dict):
            if (evaluation or {}).get("device", "auto") == "auto":
                return {**data, "evaluation": {**(evaluation or {}), "device": "cuda"}}
        elif isinstance(evaluation, EvalSettings) and "device" not in evaluation.model_fields_set:
            return {**data, "evaluation": evaluation.model_copy(update={"device": "cuda"})}
        return data

    @pydantic.model_validator(mode="after")
    def _cross_checks(self) -> AuditConfig:
        from mergeaudit.evaluation.runner import check_tasks

        problems: list[str] = []
        names = [self.base.name] + [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            problems.append(f"checkpoint names are not unique: {', '.join(dupes)}")
        known = {m.name for m in self.models}
        problems += self._output_problems()
        sizes = [s.grid_size() for s in self.strategies]
        if sum(sizes) > self.max_grid_points:
            each = ", ".join(
                f"strategies[{i}] ({s.method}) {n}" for i, (s, n) in enumerate(zip(self.strategies, sizes)) if n > 1
            )
            problems.append(
                f"the grids make {sum(sizes)} candidates ({each}), more than max_grid_points="
                f"{self.max_grid_points}; shrink them or raise max_grid_points"
            )
        for i, strat in enumerate(self.strategies):
            if sizes[i] > self.max_grid_points:
                continue  # too large to expand, even to check its points
            chosen = self.strategy_models(strat)
            unknown = [n for n in chosen + list(strat.model_params) if n not in known]
            if unknown:
                problems.append(f"strategies[{i}] ({strat.method}): unknown models {', '.join(unknown)}")
            elif not chosen:
                problems.append(f"strategies[{i}] ({strat.method}): no models to merge")
            else:
                try:
                    needs_fisher = strat.uses_fisher(chosen)
                except MergeAuditError as exc:
                    problems.append(f"strategies[{i}]: {exc}")
                    continue
                if needs_fisher and self.fisher is None:
                    problems.append(f"strategies[{i}] ({strat.method}) needs a `fisher:` section (calibration data)")
        series = [sp.name for sp in self.series]
        clash = sorted({n for n in series if series.count(n) > 1 or n in names})
        if clash:
            problems.append(f"series names must be unique and differ from the checkpoints': {', '.join(clash)}")
        for sp in self.series:
            problems += [
                f"series {sp.name}: compare_with names unknown model {n!r}"
                for n in sp.compare_with or []
                if n not in known
            ]
        everyone = set(names)
        for p in self.probes.interpolations:
            problems += [f"probes.interpolations: unknown checkpoint {n!r}" for n in (p.a, p.b) if n not in everyone]
        for p in self.probes.task_vectors:
            if p.model not in known:
                problems.append(f"probes.task_vectors: unknown model {p.model!r}")
        if self.probes.perturbation and self.probes.perturbation.models:
            problems += [
                f"probes.perturbation: unknown model {n!r}"
                for n in self.probes.perturbation.models
                if n not in everyone
            ]
        server = self.evaluation.server
        if server.command is not None:
            problems.append(
                "evaluation.server.command is not taken from a config: it runs an executable on every "
                "worker (a site's wrapper is set in code, ServerSettings(command=...))"
            )
        if server.host not in ("127.0.0.1", "::1", "localhost"):
            problems.append(
                f"evaluation.server.host {server.host!r}: the model server listens on loopback only "
                "(lm-eval is its only client, on the same worker)"
            )
        try:
            check_tasks(self.evaluation.tasks, self.evaluation.data_files)
        except MergeAuditError as exc:
            problems.append(f"evaluation: {exc}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _output_problems(self) -> list[str]:
        """Results (and the Fisher cache) must not be written inside a checkpoint folder, nor in a
        folder holding one: vacuuming or rewriting results would then touch checkpoint files."""
        problems = []
        outputs = {"results_uri": self.results_uri}
        if self.fisher is not None and self.fisher.cache_uri:
            outputs["fisher.cache_uri"] = self.fisher.cache_uri
        for what, out in outputs.items():
            inputs = [(ck.name, ck.uri) for ck in [self.base, *self.models]]
            inputs += [(f"series {sp.name}", uri) for sp in self.series for uri in sp.uris()]
            for name, uri in inputs:
                if _nested(out, uri):
                    problems.append(f"{what} {out} lies inside checkpoint {name} ({uri})")
                elif _nested(uri, out):
                    problems.append(f"{what} {out} contains checkpoint {name} ({uri})")
        return problems

    def strategy_models(self, strat: StrategySpec) -> list[str]:
        return strat.models if strat.models is not None else [m.name for m in self.models]

    def checkpoint(self, name: str) -> CheckpointSpec:
        for spec in [self.base, *self.models]:
            if spec.name == name:
                return spec
        raise ConfigError(f"no checkpoint named {name!r}")


def _method_names() -> list[str]:
    """The registered merge methods: the choices of `method` in the UI's form."""
    from mergeaudit.merging import REGISTRY

    return sorted(m.name for m in REGISTRY.methods())


def _nested(inner: str, outer: str) -> bool:
    """True when URI inner is outer or lies below it (local paths compared with symlinks resolved)."""

    def norm(uri: str) -> str:
        scheme, rest = store.split_scheme(store.check_uri(uri))
        return os.path.realpath(rest) if scheme == "file" else f"{scheme}://{rest.strip('/')}"

    try:
        a, b = norm(inner), norm(outer)
    except MergeAuditError:
        return False  # a bad URI is reported by its own validator
    return a == b or a.startswith(b.rstrip("/") + "/")


def format_validation_error(exc: pydantic.ValidationError) -> str:
    """All of a ValidationError's problems on one line: `where: what; where: what`."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


def parse_config(data: Any, source: str = "config") -> AuditConfig:
    """Validate a dict (from YAML, JSON or the Prefect UI) into an AuditConfig."""
    try:
        return AuditConfig.model_validate(data)
    except pydantic.ValidationError as exc:
        raise ConfigError(f"{source} is invalid: {format_validation_error(exc)}") from None


def load_config(path: str | Path) -> AuditConfig:
    """Load an AuditConfig from a YAML file on any store (data only; no tags, no code)."""
    uri = store.check_uri(str(path))
    try:
        raw = store.read_bytes(uri)
    except MergeAuditError:
        raise ConfigError(f"config file {path} does not exist or cannot be read") from None
    data = load_yaml(raw, source=str(path))
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, not {type(data).__name__}")
    return parse_config(data, source=str(path))


def with_models(config: AuditConfig, extra: list[CheckpointSpec]) -> AuditConfig:
    """The config with more fine-tuned models (a landed checkpoint, say), validated again. A
    checkpoint under a series' prefix is a new step of that series (measured when it resolves),
    not a model. One named like a model of the config replaces it, or is refused, as
    `landed_same_name` says; one named like the base is always refused."""
    prefixes = [sp.prefix for sp in config.series if sp.prefix]
    extra = [m for m in extra if not any(_nested(m.uri, p) for p in prefixes)]
    if not extra:
        return config
    data = config.model_dump(mode="json")
    models = {m["name"]: i for i, m in enumerate(data["models"])}
    problems = []
    for m in extra:
        if m.name == config.base.name:
            problems.append(f"landed checkpoint {m.uri} is named {m.name!r}, the base's name")
        elif m.name not in models:
            models[m.name] = len(data["models"])
            data["models"].append(m.model_dump(mode="json"))
        elif data["models"][models[m.name]]["uri"] != m.uri:
            if config.landed_same_name == "refuse":
                problems.append(
                    f"landed checkpoint {m.uri} is named {m.name!r} like the configured model at "
                    f"{data['models'][models[m.name]]['uri']} (landed_same_name: refuse)"
                )
            else:
                log.warning(
                    "landed checkpoint %s replaces model %s (%s)", m.uri, m.name, data["models"][models[m.name]]["uri"]
                )
                data["models"][models[m.name]] = m.model_dump(mode="json")
    if problems:
        raise ConfigError("; ".join(problems))
    return parse_config(data, source="config with added models")
