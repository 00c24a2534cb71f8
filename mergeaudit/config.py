"""Typed configuration: AuditConfig is both the Prefect flow parameter and the YAML file.

YAML is data: it loads with a bounded SafeLoader (`mergeaudit.safe_yaml`: no tags, no alias
bombs) into frozen pydantic models that refuse unknown keys. Validation happens before any
tensor is read and reports every problem at once: unknown store schemes, duplicate checkpoint
names, strategies naming unknown models or methods, bad or non-finite method parameters, grids
beyond `max_grid_points`, results written inside a checkpoint folder, unknown tasks.

    config = load_config("audit.yaml")
"""

from __future__ import annotations

import itertools
import math
import os
import re
from pathlib import Path  # noqa: F401 - in signatures
from typing import Any, Literal

import pydantic

from mergeaudit import store
from mergeaudit.errors import ConfigError, MergeAuditError
from mergeaudit.evaluation.spec import EvalSpec, ServerSpec  # noqa: F401 - composed here, re-exported
from mergeaudit.frozen import MAX_MAGNITUDE, Frozen  # noqa: F401 - MAX_MAGNITUDE: re-exported
from mergeaudit.safe_yaml import load_yaml

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_Frozen = Frozen


def _valid_name(v: str) -> str:
    if not _NAME_RE.match(v):
        raise ValueError(f"name {v!r} must be 1-64 characters of letters, digits, '_', '-', '.'")
    return v


def _valid_uri(v: str | None) -> str | None:
    try:
        return None if v is None else store.check_uri(v)
    except MergeAuditError as exc:
        raise ValueError(str(exc)) from None


class CheckpointSpec(_Frozen):
    """One checkpoint by a short name, where it lives, and how it was trained."""

    name: str = pydantic.Field(description="Short unique name used in tables and reports.")
    uri: str = pydantic.Field(description="Folder of the HF checkpoint: path, file://, s3:// or memory://.")
    kind: Literal["rlvr", "sft", "base", "unknown"] = pydantic.Field(
        "unknown", description="How the checkpoint was trained, for the report's contrasts."
    )

    _name_ok = pydantic.field_validator("name")(lambda v: _valid_name(v))
    _uri_ok = pydantic.field_validator("uri")(lambda v: _valid_uri(v))


class StrategySpec(_Frozen):
    """A merge method over some of the models, with mergekit-style parameters and a grid.

    `params` are global settings exactly as in a mergekit config (scalars, per-layer gradient
    lists, `{filter, value}` conditions); `model_params` holds per-model settings by name
    (`weight`, `density`, ...); `grid` sweeps global settings, one candidate per point.
    """

    method: str = pydantic.Field(description="Registry name, as in mergekit (linear, ties, dare_ties, sar, ...).")
    models: list[str] | None = pydantic.Field(
        None, description="Names of the fine-tuned checkpoints to merge; default: all of them."
    )
    params: dict[str, Any] = pydantic.Field(default_factory=dict, description="Global method parameters.")
    model_params: dict[str, dict[str, Any]] = pydantic.Field(
        default_factory=dict, description="Per-model parameters, by model name."
    )
    grid: dict[str, list[Any]] = pydantic.Field(
        default_factory=dict, description="Parameters to sweep: one candidate per point of the product."
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


class FisherSpec(_Frozen):
    """How the diagonal Fisher of each fine-tuned model is estimated (for fisher and sar)."""

    calibration: str = pydantic.Field(description="JSONL of {prompt, response} rows (path or store URI).")
    max_examples: int = pydantic.Field(64, ge=1)
    max_length: int = pydantic.Field(256, ge=8)
    cache_uri: str | None = pydantic.Field(None, description="Where Fisher checkpoints are cached (default RESULTS/fisher).")


class StorageSpec(_Frozen):
    """How checkpoints are read: credentials, completeness marker, local read-through cache."""

    credentials_block: str | None = pydantic.Field(
        None,
        pattern=r"^(aws-credentials|minio-credentials)/[A-Za-z0-9_-]+$",
        description="Prefect block holding S3 credentials ('aws-credentials/NAME' or "
        "'minio-credentials/NAME'); default: the standard AWS environment.",
    )
    completion_marker: str | None = pydantic.Field(
        None, pattern=r"^[A-Za-z0-9_.-]+$",
        description="File a checkpoint folder must hold to count as complete (e.g. _COMPLETE).",
    )
    cache: Literal["auto", "off"] = pydantic.Field(
        "auto", description="auto: checkpoints on object stores (s3://, memory://) are copied once into a local "
        "read-through cache keyed by fingerprint and read from there (local paths are read in place); off: every "
        "read goes to the store.")
    cache_dir: str | None = pydantic.Field(
        None, description="Folder of the cache (default: $MERGEAUDIT_CACHE_DIR, else "
        "$XDG_CACHE_HOME/mergeaudit/checkpoints, else ~/.cache/mergeaudit/checkpoints).")
    cache_max_gb: float = pydantic.Field(
        100.0, gt=0, description="Size limit of the cache in GiB; least recently used entries are evicted, and a "
        "checkpoint that does not fit is read in place, with a warning.")


class GeometrySpec(_Frozen):
    """Which update-geometry figures to compute (see mergeaudit.geometry)."""

    eta: float = pydantic.Field(1e-3, gt=0, description="Relative tolerance of the `rel` update mask.")
    abs_tol: float = pydantic.Field(1e-5, ge=0, description="Absolute tolerance of the `abs` update mask.")
    spectral: bool = pydantic.Field(True, description="Stable rank, top-k energy shares, principal angles.")
    top_k_fraction: float = pydantic.Field(0.01, gt=0, le=1, description="k as a fraction of min(m, n).")
    exact_max_dim: int = pydantic.Field(1024, ge=1, description="Exact SVD up to this min(m, n); randomized above.")
    principal_alpha: float | None = pydantic.Field(
        0.05, gt=0, le=1, description="Zhu et al.'s principal weights: the top alpha of |U_k S_k V_k^T| (null: off).")


class SeriesStep(_Frozen):
    step: int = pydantic.Field(ge=0, description="Training step the checkpoint was saved at.")
    uri: str = pydantic.Field(description="Folder of the checkpoint.")

    _uri_ok = pydantic.field_validator("uri")(lambda v: _valid_uri(v))


class SeriesSpec(_Frozen):
    """Checkpoints one training run saved, by step: geometry as a function of the step
    (`geometry_series`, mergeaudit.geometry.series). Give the steps, or a prefix under which
    every complete checkpoint folder with a number in its path (`step-100`, `checkpoint-200`)
    is a step, found as the watcher finds new checkpoints."""

    name: str = pydantic.Field(description="Name of the run; its steps are `name@step` in tables.")
    kind: Literal["rlvr", "sft", "unknown"] = pydantic.Field("unknown", description="How the run trains.")
    steps: list[SeriesStep] | None = pydantic.Field(None, description="The checkpoints by step.")
    prefix: str | None = pydantic.Field(None, description="...or where the run saves them (path or s3://).")
    compare_with: list[str] | None = pydantic.Field(
        None, description="Models of the audit whose updates each step is compared with (default: all).")
    max_steps: int = pydantic.Field(
        16, ge=2, le=256, description="Most steps measured: evenly spaced, first and last kept.")

    _name_ok = pydantic.field_validator("name")(lambda v: _valid_name(v))
    _prefix_ok = pydantic.field_validator("prefix")(lambda v: _valid_uri(v))

    @pydantic.model_validator(mode="after")
    def _one_source(self) -> SeriesSpec:
        if (self.steps is None) == (self.prefix is None):
            raise ValueError(f"series {self.name}: give `steps` or `prefix`, not both or neither")
        numbers = [s.step for s in self.steps or []]
        if len(set(numbers)) != len(numbers):
            raise ValueError(f"series {self.name}: a step number appears twice")
        if self.steps is not None and not self.steps:
            raise ValueError(f"series {self.name}: `steps` is empty")
        return self

    def uris(self) -> list[str]:
        return [self.prefix] if self.prefix else [s.uri for s in self.steps or []]


class InterpolationProbe(_Frozen):
    """theta(alpha) = (1 - alpha) theta_a + alpha theta_b; the barrier is the worst dip below
    the straight line between the endpoints' scores."""

    a: str
    b: str
    alphas: list[float] = pydantic.Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0], min_length=3)

    @pydantic.field_validator("alphas")
    @classmethod
    def _endpoints(cls, v: list[float]) -> list[float]:
        if 0.0 not in v or 1.0 not in v:
            raise ValueError("alphas must include both endpoints 0 and 1")
        return sorted(set(v))


class TaskVectorProbe(_Frozen):
    """theta(lambda) = base + lambda (theta_model - base)."""

    model: str
    lambdas: list[float] = pydantic.Field(default_factory=lambda: [0.0, 0.5, 1.0, 1.5, 2.0], min_length=2)


class PerturbationProbe(_Frozen):
    """Weight perturbations of each model, `seeds` draws per setting: Gaussian noise with a
    standard deviation of `scale` x each tensor's RMS (`weight_rms`) or x the RMS of the task
    vector on its support, added only there (`task_vector`, as the fragility literature
    perturbs updates), and a DARE-style random drop of a fraction of the task vector (rescaled
    by 1 / (1 - rate))."""

    models: list[str] | None = pydantic.Field(None, description="Default: every fine-tuned model.")
    gaussian_scales: list[float] = pydantic.Field(default_factory=lambda: [0.01, 0.03, 0.1])
    gaussian_scale_to: list[Literal["weight_rms", "task_vector"]] = pydantic.Field(
        default_factory=lambda: ["weight_rms"], min_length=1,
        description="What the noise is scaled to; each entry is its own probe family "
                    "(gaussian, gaussian_task_vector).")
    drop_rates: list[float] = pydantic.Field(default_factory=lambda: [0.3, 0.6, 0.9])
    seeds: int = pydantic.Field(2, ge=1, le=64)

    @pydantic.model_validator(mode="after")
    def _ranges(self) -> PerturbationProbe:
        if any(s < 0 for s in self.gaussian_scales):
            raise ValueError("gaussian_scales must be >= 0")
        if any(not 0 <= r < 1 for r in self.drop_rates):
            raise ValueError("drop_rates must lie in [0, 1)")
        return self


class ProbeSpec(_Frozen):
    """Fragility probes, scored as candidates like any merge."""

    interpolations: list[InterpolationProbe] = pydantic.Field(default_factory=list)
    task_vectors: list[TaskVectorProbe] = pydantic.Field(default_factory=list)
    perturbation: PerturbationProbe | None = None


class AlarmSpec(_Frozen):
    """The regression alarm: when a score drop against the previous run of this audit counts."""

    enabled: bool = pydantic.Field(True, description="Compare each run with the previous committed run.")
    max_drop: float = pydantic.Field(0.02, ge=0.0, description="Flag drops larger than this (score units)...")
    significance: float = pydantic.Field(
        0.05, gt=0.0, lt=1.0, description="...whose one-sided p-value is at most this: McNemar's exact test or a "
        "paired t-test on the prompts both runs share, Welch's z only when the prompts differ (mergeaudit.results).")
    metrics: Literal["primary", "all"] = pydantic.Field(
        "primary", description="primary: each task's ranking metric; all: every metric where higher is better.")

    @pydantic.model_validator(mode="before")
    @classmethod
    def _z_as_significance(cls, data: Any) -> Any:
        """`z` (the first round's alarm: drops beyond z standard errors) still reads, as the
        one-sided level it meant: significance = P(Z > z)."""
        if isinstance(data, dict) and "z" in data:
            data = dict(data)
            z = data.pop("z")
            if "significance" in data:
                raise ValueError("give alarm.significance or the deprecated alarm.z, not both")
            if not isinstance(z, (int, float)) or isinstance(z, bool) or not math.isfinite(z) or not 0 < z < 40:
                raise ValueError(f"alarm.z must be a number in (0, 40), not {z!r}")
            data["significance"] = 0.5 * math.erfc(z / math.sqrt(2))
        return data


class AuditConfig(_Frozen):
    """One merge audit: a base, fine-tuned checkpoints, merge strategies, evaluation, results."""

    name: str = pydantic.Field("merge-audit", description="Audit name; runs of one name are compared.")
    base: CheckpointSpec
    models: list[CheckpointSpec] = pydantic.Field(min_length=1, description="Fine-tuned checkpoints.")
    strategies: list[StrategySpec] = pydantic.Field(default_factory=list)
    evaluation: EvalSpec = pydantic.Field(default_factory=EvalSpec)
    results_uri: str = pydantic.Field(description="Where the Parquet tables go (path, file://, s3://).")
    storage: StorageSpec = pydantic.Field(default_factory=StorageSpec)
    geometry: GeometrySpec = pydantic.Field(default_factory=GeometrySpec)
    fisher: FisherSpec | None = pydantic.Field(None, description="Needed by the fisher and sar methods.")
    probes: ProbeSpec = pydantic.Field(default_factory=ProbeSpec, description="Fragility probes.")
    series: list[SeriesSpec] = pydantic.Field(
        default_factory=list, description="Training runs measured step by step (geometry only).")
    alarm: AlarmSpec = pydantic.Field(default_factory=AlarmSpec, description="Regression alarm.")
    routing: Literal["inline", "pools"] = pydantic.Field(
        "inline", description="inline: everything in this process; pools: evaluations as runs of evaluate_deployment."
    )
    evaluate_deployment: str = pydantic.Field("evaluate/gpu", description="Deployment that evaluates one candidate.")
    score_inputs: bool = pydantic.Field(True, description="Also score the base and each fine-tune as references.")
    max_grid_points: int = pydantic.Field(
        4096, ge=1, le=1_000_000,
        description="Most candidates all strategies' grids may make together (each is a merge and an evaluation).")

    _name_ok = pydantic.field_validator("name")(lambda v: _valid_name(v))
    _results_ok = pydantic.field_validator("results_uri")(lambda v: _valid_uri(v))

    @pydantic.model_validator(mode="after")
    def _cross_checks(self) -> AuditConfig:
        from mergeaudit.evaluation.runner import check_tasks
        from mergeaudit.merging import REGISTRY
        from mergeaudit.merging.params import check_all

        problems: list[str] = []
        names = [self.base.name] + [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            problems.append(f"checkpoint names are not unique: {', '.join(dupes)}")
        known = {m.name for m in self.models}
        problems += self._output_problems()
        sizes = [s.grid_size() for s in self.strategies]
        if sum(sizes) > self.max_grid_points:
            each = ", ".join(f"strategies[{i}] ({s.method}) {n}" for i, (s, n) in enumerate(zip(self.strategies, sizes))
                             if n > 1)
            problems.append(f"the grids make {sum(sizes)} candidates ({each}), more than max_grid_points="
                            f"{self.max_grid_points}; shrink them or raise max_grid_points")
        for i, strat in enumerate(self.strategies):
            if sizes[i] > self.max_grid_points:
                continue  # too large to expand, even to check its points
            chosen = strat.models if strat.models is not None else [m.name for m in self.models]
            unknown = [n for n in chosen + list(strat.model_params) if n not in known]
            if unknown:
                problems.append(f"strategies[{i}] ({strat.method}): unknown models {', '.join(unknown)}")
                continue
            if not chosen:
                problems.append(f"strategies[{i}] ({strat.method}): no models to merge")
                continue
            per_model = [strat.model_params.get(n, {}) for n in chosen]
            for point in strat.points():
                try:
                    method = REGISTRY.get(strat.method)
                    # the real check runs per tensor once headers are read; these two tensors
                    # (first and last layer) catch bad names, types and ranges now
                    resolved = check_all(method, [("model.layers.0.w", 0), ("model.layers.1.w", 1)], 2,
                                         point, per_model, has_base=True)
                    if self.fisher is None and any(p.uses_fisher() for p in resolved.values()):
                        problems.append(f"strategies[{i}] ({strat.method}) needs a `fisher:` section (calibration data)")
                except MergeAuditError as exc:
                    problems.append(f"strategies[{i}]: {exc}")
                    break
        series = [sp.name for sp in self.series]
        clash = sorted({n for n in series if series.count(n) > 1 or n in names})
        if clash:
            problems.append(f"series names must be unique and differ from the checkpoints': {', '.join(clash)}")
        for sp in self.series:
            problems += [f"series {sp.name}: compare_with names unknown model {n!r}" for n in sp.compare_with or []
                         if n not in known]
        everyone = set(names)
        for p in self.probes.interpolations:
            problems += [f"probes.interpolations: unknown checkpoint {n!r}" for n in (p.a, p.b) if n not in everyone]
        for p in self.probes.task_vectors:
            if p.model not in known:
                problems.append(f"probes.task_vectors: unknown model {p.model!r}")
        if self.probes.perturbation and self.probes.perturbation.models:
            problems += [f"probes.perturbation: unknown model {n!r}" for n in self.probes.perturbation.models
                         if n not in everyone]
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
    """The config with more fine-tuned models (a landed checkpoint, say), validated again."""
    if not extra:
        return config
    data = config.model_dump(mode="json")
    names = {m["name"] for m in data["models"]}
    # a checkpoint of a series' prefix is a new step of that series (measured when it resolves)
    prefixes = [sp.prefix for sp in config.series if sp.prefix]
    extra = [m for m in extra if not any(_nested(m.uri, p) for p in prefixes)]
    if not extra:
        return config
    data["models"] += [m.model_dump(mode="json") for m in extra if m.name not in names]
    return parse_config(data, source="config with added models")
