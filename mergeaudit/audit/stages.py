"""The stages the merge-audit flow chains, as plain library functions (each a Prefect task in
tasks/audit.py): preflight, Fisher, geometry, and committing a run's tables. Planning
candidates is mergeaudit.audit.candidates; evaluating them, mergeaudit.audit.evaluations."""

from __future__ import annotations

import datetime as dt
import json
import logging

from mergeaudit import fisher, store, tables
from mergeaudit.audit.evaluations import load_evaluation
from mergeaudit.audit.records import Candidate, CheckpointRecord, EvaluationRecord, RunOutcome, new_run_id
from mergeaudit.audit.rows import package_versions, result_rows, run_row
from mergeaudit.checkpoint import Checkpoint, check_compatible
from mergeaudit.checkpoint.reads import input_totals
from mergeaudit.config import AuditConfig
from mergeaudit.errors import CheckpointError, ConfigError, MergeAuditError
from mergeaudit.geometry import GeometrySettings, parse_tensor_name, series
from mergeaudit.geometry import compute_geometry as geometry_rows
from mergeaudit.merging import REGISTRY
from mergeaudit.merging.params import check_all
from mergeaudit.results import compare, geometry_views, leaderboard
from mergeaudit.results.scores import RunResults

log = logging.getLogger(__name__)


def preflight(config: AuditConfig) -> dict[str, CheckpointRecord]:
    """Everything that can be checked before a tensor is read, every problem at once: each
    checkpoint opens (headers; remembered per process, so later stages do not read them
    again), is complete and matches the base's tensors, and every strategy's parameters hold for
    every real tensor name and layer of the base. Returns the checkpoint records."""
    opened, kinds, steps = _open_all(config)
    base = opened[config.base.name]
    problems = _strategy_problems(config, base)
    if problems:
        raise ConfigError("; ".join(problems))
    return _records(opened, kinds, steps)


def resolve_checkpoints(config: AuditConfig) -> dict[str, CheckpointRecord]:
    """Open every checkpoint (headers only) and check names and shapes agree with the base;
    each series' steps (listed, or found under its prefix now) are records too, `run@step`."""
    return _records(*_open_all(config))


def _open_all(config: AuditConfig) -> tuple[dict[str, Checkpoint], dict[str, str], dict[str, tuple[str, int]]]:
    opened = {spec.name: Checkpoint.open(spec.uri) for spec in [config.base, *config.models]}
    kinds = {config.base.name: "base", **{m.name: m.kind for m in config.models}}
    steps: dict[str, tuple[str, int]] = {}
    marker = config.storage.completion_marker
    for spec in config.series:
        for step, uri in spec.found_steps(marker):
            label = series.step_label(spec.name, step)
            opened[label], kinds[label], steps[label] = Checkpoint.open(uri), spec.kind, (spec.name, step)
    unmarked = [ck.uri for ck in opened.values() if marker and marker not in ck.files]
    if unmarked:
        raise CheckpointError(f"incomplete checkpoints (no {marker}): {', '.join(unmarked)}")
    check_compatible(opened[config.base.name], [ck for name, ck in opened.items() if name != config.base.name])
    return opened, kinds, steps


def _records(
    opened: dict[str, Checkpoint], kinds: dict[str, str], steps: dict[str, tuple[str, int]]
) -> dict[str, CheckpointRecord]:
    return {
        name: CheckpointRecord(
            name=name,
            uri=ck.uri,
            kind=kinds[name],
            fingerprint=ck.fingerprint,
            n_tensors=len(ck.keys()),
            nbytes=ck.nbytes,
            model_type=ck.config.get("model_type"),
            dtype=_main_dtype(ck),
            series=steps.get(name, (None,))[0],
            step=steps.get(name, (None, None))[1],
            size=sum(f.size for f in ck.files.values()),
        )
        for name, ck in opened.items()
    }


def _strategy_problems(config: AuditConfig, base: Checkpoint) -> list[str]:
    """Each strategy's grid points checked against the base's real tensor names and layers."""
    tensors = [(n, parse_tensor_name(n)[0]) for n in base.keys()]
    num_layers = base.config.get("num_hidden_layers")
    problems = []
    for i, strat in enumerate(config.strategies):
        method = REGISTRY.get(strat.method)
        per_model = [strat.model_params.get(n, {}) for n in config.strategy_models(strat)]
        for point in strat.points():
            try:
                check_all(method, tensors, num_layers, point, per_model, has_base=True)
            except MergeAuditError as exc:
                problems.append(f"strategies[{i}]: {exc}")
                break
    return problems


def _main_dtype(ck: Checkpoint) -> str | None:
    """The dtype holding most of the checkpoint's bytes (F32, BF16, F16)."""
    sizes: dict[str, int] = {}
    for name in ck.keys():
        spec = ck.spec(name)
        sizes[spec.dtype] = sizes.get(spec.dtype, 0) + spec.nbytes
    return max(sizes, key=sizes.get) if sizes else None


def compute_geometry(
    config: AuditConfig, records: dict[str, CheckpointRecord], fisher_uris: dict[str, str] | None = None
) -> dict[str, list[dict]]:
    """geometry_tensors and geometry_pairs rows for every fine-tuned model against the base
    (with the Fisher-mass columns for models whose Fisher was estimated), and geometry_series
    rows for every series."""
    storage = config.storage
    base = storage.open(records[config.base.name].uri)
    models = {m.name: storage.open(records[m.name].uri) for m in config.models}
    kinds = {m.name: m.kind for m in config.models}
    fishers = {name: storage.open(uri) for name, uri in (fisher_uris or {}).items() if name in models}
    shared: dict = {}  # the base's decompositions, made once for the models and every series
    tensor_rows, pair_rows = geometry_rows(base, models, kinds, config.geometry, fisher=fishers, decompositions=shared)
    series_rows: list[dict] = []
    for spec in config.series:
        steps = [(r.step, storage.open(r.uri)) for r in records.values() if r.series == spec.name]
        others = {n: models[n] for n in (spec.compare_with if spec.compare_with is not None else models)}
        series_rows += series.compute_series(base, spec.name, steps, others, spec.kind, config.geometry, shared)
    return {"geometry_tensors": tensor_rows, "geometry_pairs": pair_rows, "geometry_series": series_rows}


def estimate_fisher(config: AuditConfig, records: dict[str, CheckpointRecord], name: str) -> str:
    """One model's Fisher checkpoint URI (computed once per model version and calibration set),
    cached under `fisher.cache_uri` (default RESULTS/fisher), on `fisher.device` (default the
    evaluation's inline, cpu with routing: pools)."""
    settings = config.fisher.model_copy(
        update={
            "cache_uri": config.fisher.cache_uri or store.join(config.results_uri, "fisher"),
            # with routing: pools this runs in the audit's own run, on the cpu pool
            "device": config.fisher.device or (config.evaluation.device if config.routing == "inline" else "cpu"),
        }
    )
    return fisher.estimate_fisher(records[name].uri, settings, opener=config.storage.open)


def finish_run(
    config: AuditConfig,
    run_id: str,
    started_at: dt.datetime,
    checkpoints: dict[str, CheckpointRecord],
    geometry_tables: dict[str, list[dict]],
    candidates: list[Candidate],
    evaluations: list[EvaluationRecord],
    bytes_read: dict[str, int] | None = None,
) -> RunOutcome:
    """Load the stored evaluations, compare with the previous run of this audit, and commit the
    run's tables (one manifest, written last). `bytes_read`, this process's reads since the run
    began (a `store.bytes_read_since`), plus what evaluations read elsewhere, are the run's
    bytes read per input (none reported without it)."""
    results = [load_evaluation(e) for e in evaluations if e.status == "ok"]
    failures = {e.candidate_id: e.error or "failed" for e in evaluations if e.status == "failed"}
    rows = result_rows(config, checkpoints, geometry_tables, candidates, results, failures)
    run = RunResults(config.results_uri, run_id, {**rows, "runs": [{"audit_name": config.name}]})
    check = None
    if config.alarm.enabled:
        previous = [m for m in tables.committed_runs(config.results_uri) if m["run_id"] != run_id]
        check = compare.check(run, config.alarm, previous)
    rows["runs"] = [
        run_row(
            config.name,
            started_at,
            config.model_dump_json(),
            status="failed" if failures else "completed",
            n_candidates=len(candidates),
            n_failed=len(failures),
            previous_run_id=check.previous_run_id if check else None,
            regressions_json=json.dumps([r.model_dump() for r in check.regressions]) if check else None,
        )
    ]
    files = tables.write_run(
        config.results_uri,
        run_id,
        f"{started_at:%Y-%m-%d}",
        rows,
        audit_name=config.name,
        package_versions=package_versions(),
    )
    names = {c.candidate_id: c.name for c in candidates}
    return RunOutcome(
        run_id=run_id,
        results_uri=config.results_uri,
        tables=files,
        summary=leaderboard.summary(run),
        failed=[names[cid] for cid in failures],
        regressions=check,
        notes=geometry_views.not_compared(geometry_tables.get("geometry_tensors", [])),
        bytes_read={}
        if bytes_read is None
        else input_totals(
            {n: r.uri for n, r in checkpoints.items()},
            bytes_read,
            [e.bytes_read for e in evaluations if e.read_by != store.process_tag()],
        ),
        input_sizes={n: r.size for n, r in checkpoints.items() if r.size is not None},
    )


def geometry_run(
    base_uri: str, models: dict[str, str], kinds: dict[str, str], settings: GeometrySettings, results_uri: str
) -> tuple[str, dict[str, str], list[dict], list[dict]]:
    """Geometry alone (`mergeaudit geometry`): the models' updates against the base, committed
    as a run of geometry_tensors and geometry_pairs; returns (run id, table URIs, tensor rows,
    pair rows)."""
    started = dt.datetime.now(dt.timezone.utc)
    out = store.check_uri(results_uri)
    base = Checkpoint.open(base_uri)
    opened = {n: Checkpoint.open(u) for n, u in models.items()}
    tensor_rows, pair_rows = geometry_rows(base, opened, kinds, settings)
    run_id = new_run_id(started)
    params = {"base": base.uri, "models": models, "kinds": kinds, "geometry": settings.model_dump()}
    files = tables.write_run(
        out,
        run_id,
        f"{started:%Y-%m-%d}",
        {
            "geometry_tensors": tensor_rows,
            "geometry_pairs": pair_rows,
            "runs": [run_row("geometry", started, json.dumps(params, sort_keys=True))],
        },
    )
    return run_id, files, tensor_rows, pair_rows
