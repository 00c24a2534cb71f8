"""The stages of a merge audit as plain library functions; the Prefect flow only chains them.

    config = load_config("audit.yaml")
    records = resolve_checkpoints(config)            # open + validate, no tensor read
    fisher_uris = {n: estimate_fisher(config, records, n) for n in fisher_models(config)}
    geo = compute_geometry(config, records, fisher_uris)  # streamed, per tensor and model
    cands = plan_candidates(config, records)          # small, serialisable recipes
    results = [evaluate_candidate(c, config.evaluation) for c in cands]
    write_results(config, run_id, ...)                # Parquet tables

Stages exchange URIs and small records (pydantic models), never tensors or models: a recipe is
materialised next to where it is evaluated.
"""

from __future__ import annotations

import datetime as dt
import gc
import hashlib
import importlib.metadata
import json
import logging
import os
import tempfile
import uuid
from typing import Any, Literal

import pydantic
import torch

import mergeaudit
from mergeaudit import fisher, geometry, probes, store, tables
from mergeaudit.checkpoint import Checkpoint, CheckpointCache, check_compatible, write_checkpoint
from mergeaudit.checkpoint.cache import default_cache_dir
from mergeaudit.checkpoint.reads import by_checkpoint, input_totals
from mergeaudit.config import (
    AuditConfig,
    EvalSpec,
    GeometrySpec,
    SeriesSpec,
    StorageSpec,
    StrategySpec,
)
from mergeaudit.errors import CheckpointError, EvaluationError
from mergeaudit.evaluation import EvalSettings, check_tasks, evaluate_model
from mergeaudit.evaluation.runner import check_prompting
from mergeaudit.evaluation.sandbox import SandboxLimits, require_isolation
from mergeaudit.geometry import series
from mergeaudit.merging import REGISTRY
from mergeaudit.merging.executor import MergePlan, ModelRef, prepare
from mergeaudit.merging.params import check_all
from mergeaudit.modeling import build_model, load_tokenizer
from mergeaudit.results import compare, fragility, geometry_views, leaderboard
from mergeaudit.results.compare import RegressionReport
from mergeaudit.results.scores import RunResults

log = logging.getLogger(__name__)

PACKAGES = ("torch", "transformers", "lm_eval", "prefect", "safetensors", "pyarrow", "s3fs", "fsspec")


class CheckpointRecord(pydantic.BaseModel):
    """A resolved checkpoint: where it is, what it is, and the fingerprint of its files."""

    model_config = pydantic.ConfigDict(frozen=True)
    name: str
    uri: str
    kind: str
    fingerprint: str
    n_tensors: int
    nbytes: int
    model_type: str | None = None
    dtype: str | None = None
    series: str | None = None  # a step of this series (config.series), not a model of the audit
    step: int | None = None
    size: int | None = None  # bytes of all its files: what one full read (a cache fill) fetches


class Candidate(pydantic.BaseModel):
    """Something we score: a stored checkpoint, or a merge recipe (a MergePlan) of named
    checkpoints, materialised where it is evaluated."""

    model_config = pydantic.ConfigDict(frozen=True)
    candidate_id: str
    name: str
    kind: Literal["checkpoint", "merge", "probe"]
    inputs: list[CheckpointRecord]
    base: CheckpointRecord
    plan: MergePlan | None = None
    probe: dict[str, Any] | None = None

    @property
    def method(self) -> str | None:
        return self.plan.method if self.plan else None

    @property
    def params(self) -> dict[str, Any]:
        if self.plan is None:
            return {}
        out = {"parameters": self.plan.parameters, "model_parameters": self.plan.model_parameters,
               "seed": self.plan.seed, "out_dtype": self.plan.out_dtype}
        return {**out, "probe": self.probe} if self.probe else out

    @property
    def params_hash(self) -> str:
        return _digest(self.params)[:16]


class CandidateResult(pydantic.BaseModel):
    """What evaluating one candidate produced: score rows, per-sample verdicts, and the bf16
    sparsity of its update."""

    candidate_id: str
    scores: list[dict[str, Any]]
    samples: list[dict[str, Any]] = []
    update_sparsity_bf16: float | None


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def new_run_id(now: dt.datetime | None = None) -> str:
    """A sortable, path-safe run id: UTC timestamp plus 8 random hex digits."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def package_versions() -> dict[str, str]:
    out = {"mergeaudit": mergeaudit.__version__}
    for pkg in PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def open_checkpoint(uri: str, storage: StorageSpec) -> Checkpoint:
    """Open a checkpoint through the read-through cache (on unless `storage.cache` is off; it
    copies checkpoints on object stores, and local ones are read in place)."""
    cache = None
    if storage.cache != "off":
        cache = CheckpointCache(storage.cache_dir or default_cache_dir(), max_bytes=int(storage.cache_max_gb * 1024**3))
    return Checkpoint.open(uri, cache=cache)


def resolve_checkpoints(config: AuditConfig) -> dict[str, CheckpointRecord]:
    """Open every checkpoint (headers only) and check names and shapes agree with the base;
    each series' steps (listed, or found under its prefix now) are records too, `run@step`."""
    opened = {spec.name: Checkpoint.open(spec.uri) for spec in [config.base, *config.models]}
    kinds = {config.base.name: "base", **{m.name: m.kind for m in config.models}}
    steps: dict[str, tuple[str, int]] = {}
    for spec in config.series:
        for step, uri in series_steps(spec, config.storage.completion_marker):
            label = series.step_label(spec.name, step)
            opened[label], kinds[label], steps[label] = Checkpoint.open(uri), spec.kind, (spec.name, step)
    marker = config.storage.completion_marker
    unmarked = [ck.uri for ck in opened.values() if marker and marker not in ck.files]
    if unmarked:
        raise CheckpointError(f"incomplete checkpoints (no {marker}): {', '.join(unmarked)}")
    check_compatible(opened[config.base.name], [ck for name, ck in opened.items() if name != config.base.name])
    return {
        name: CheckpointRecord(name=name, uri=ck.uri, kind=kinds[name], fingerprint=ck.fingerprint,
                               n_tensors=len(ck.keys()), nbytes=ck.nbytes, model_type=ck.config.get("model_type"),
                               dtype=_main_dtype(ck), series=steps.get(name, (None,))[0],
                               step=steps.get(name, (None, None))[1], size=sum(f.size for f in ck.files.values()))
        for name, ck in opened.items()
    }


def series_steps(spec: SeriesSpec, marker: str | None) -> list[tuple[int, str]]:
    """A series' (step, uri) pairs: as listed, or the complete checkpoints under its prefix;
    at most `max_steps`, evenly spaced."""
    if spec.steps is not None:
        found = sorted((s.step, s.uri) for s in spec.steps)
    else:
        found, skipped = series.discover_steps(spec.prefix, marker)
        for line in skipped:
            log.warning("series %s: left out %s", spec.name, line)
        if not found:
            raise CheckpointError(f"series {spec.name}: no complete checkpoint with a step number under {spec.prefix}")
    return series.spaced(found, spec.max_steps)


def _main_dtype(ck: Checkpoint) -> str | None:
    """The dtype holding most of the checkpoint's bytes (F32, BF16, F16)."""
    sizes: dict[str, int] = {}
    for name in ck.keys():
        spec = ck.spec(name)
        sizes[spec.dtype] = sizes.get(spec.dtype, 0) + spec.nbytes
    return max(sizes, key=sizes.get) if sizes else None


def geometry_settings(spec: GeometrySpec) -> geometry.GeometrySettings:
    spectral = geometry.SpectralSettings(top_k_fraction=spec.top_k_fraction, exact_max_dim=spec.exact_max_dim)
    return geometry.GeometrySettings(eta=spec.eta, abs_tol=spec.abs_tol, spectral=spectral if spec.spectral else None,
                                     principal_alpha=spec.principal_alpha)


def compute_geometry(config: AuditConfig, records: dict[str, CheckpointRecord],
                     fisher_uris: dict[str, str] | None = None) -> dict[str, list[dict]]:
    """geometry_tensors and geometry_pairs rows for every fine-tuned model against the base
    (with the Fisher-mass columns for models whose Fisher was estimated), and geometry_series
    rows for every series."""
    base = open_checkpoint(records[config.base.name].uri, config.storage)
    models = {m.name: open_checkpoint(records[m.name].uri, config.storage) for m in config.models}
    kinds = {m.name: m.kind for m in config.models}
    fishers = {name: open_checkpoint(uri, config.storage) for name, uri in (fisher_uris or {}).items() if name in models}
    settings = geometry_settings(config.geometry)
    shared: dict = {}  # the base's decompositions, made once for the models and every series
    tensor_rows, pair_rows = geometry.compute_geometry(base, models, kinds, settings, fisher=fishers,
                                                       decompositions=shared)
    series_rows: list[dict] = []
    for spec in config.series:
        steps = [(r.step, open_checkpoint(r.uri, config.storage)) for r in records.values() if r.series == spec.name]
        others = {n: models[n] for n in (spec.compare_with if spec.compare_with is not None else models)}
        series_rows += series.compute_series(base, spec.name, steps, others, spec.kind, settings, shared)
    return {"geometry_tensors": tensor_rows, "geometry_pairs": pair_rows, "geometry_series": series_rows}


def fisher_models(config: AuditConfig) -> list[str]:
    """Names of the models whose Fisher some strategy needs."""
    needed: list[str] = []
    for strat in config.strategies:
        method = REGISTRY.get(strat.method)
        names = config.strategy_models(strat)
        per_model = [strat.model_params.get(n, {}) for n in names]
        for point in strat.points():
            resolved = check_all(method, [("model.layers.0.w", 0)], 1, point, per_model, has_base=True)
            if any(p.uses_fisher() for p in resolved.values()):
                needed += [n for n in names if n not in needed]
    return needed


def estimate_fisher(config: AuditConfig, records: dict[str, CheckpointRecord], name: str) -> str:
    """One model's Fisher checkpoint URI (computed once per model version and calibration set)."""
    spec = config.fisher
    cache = spec.cache_uri or store.join(config.results_uri, "fisher")
    settings = fisher.FisherSettings(max_examples=spec.max_examples, max_length=spec.max_length,
                                     device=config.evaluation.device)
    return fisher.estimate_fisher(records[name].uri, spec.calibration, cache, settings,
                                  opener=lambda uri: open_checkpoint(uri, config.storage))


def merge_plan(config: AuditConfig, records: dict[str, CheckpointRecord], strat: StrategySpec,
               point: dict[str, Any], fisher_uris: dict[str, str]) -> MergePlan:
    names = config.strategy_models(strat)
    base = records[config.base.name]
    return MergePlan(
        method=strat.method,
        base=ModelRef(id=base.name, uri=base.uri),
        models=[ModelRef(id=n, uri=records[n].uri) for n in names],
        parameters=point,
        model_parameters=[strat.model_params.get(n, {}) for n in names],
        compute_dtype="float32",
        out_dtype=strat.out_dtype,
        seed=strat.seed,
        device=config.evaluation.device,
        fisher={n: fisher_uris[n] for n in names if n in fisher_uris},
    )


def plan_candidates(config: AuditConfig, records: dict[str, CheckpointRecord],
                    fisher_uris: dict[str, str] | None = None) -> list[Candidate]:
    """The references (base and fine-tunes, when score_inputs) and one merge per grid point.

    Every merge plan is validated here against the real headers (each tensor's parameters,
    shapes, Fisher sources), so a bad strategy fails before any evaluation starts.
    """
    base = records[config.base.name]
    out: list[Candidate] = []
    if config.score_inputs:
        for spec in [config.base, *config.models]:
            rec = records[spec.name]
            cid = _digest({"kind": "checkpoint", "fingerprint": rec.fingerprint})[:20]
            out.append(Candidate(candidate_id=cid, name=spec.name, kind="checkpoint", inputs=[rec], base=base))
    for strat in config.strategies:
        names = config.strategy_models(strat)
        for point in strat.points():
            plan = merge_plan(config, records, strat, point, fisher_uris or {})
            prepare(plan)
            recipe = {"plan": plan.model_dump(mode="json", exclude={"device"}),
                      "fingerprints": [base.fingerprint] + [records[n].fingerprint for n in names],
                      "version": mergeaudit.__version__}
            label = ",".join(f"{k}={point[k]}" for k in sorted(strat.grid))
            name = f"{strat.method}({'+'.join(names)}{'; ' + label if label else ''})"
            out.append(Candidate(candidate_id=_digest(recipe)[:20], name=name, kind="merge",
                                 inputs=[records[n] for n in names], base=base, plan=plan))
    refs = {name: ModelRef(id=name, uri=rec.uri) for name, rec in records.items()}
    for name, probe, plan in probes.probe_plans(config, refs):
        prepare(plan)
        recipe = {"plan": plan.model_dump(mode="json", exclude={"device"}),
                  "fingerprints": [records[m.id].fingerprint for m in [plan.base, *plan.models]],
                  "version": mergeaudit.__version__}
        out.append(Candidate(candidate_id=_digest(recipe)[:20], name=name, kind="probe",
                             inputs=[records[m.id] for m in plan.models], base=base, plan=plan, probe=probe))
    seen: set[str] = set()
    return [c for c in out if not (c.candidate_id in seen or seen.add(c.candidate_id))]


def candidate_tensors(candidate: Candidate, storage: StorageSpec):
    """Stream the candidate's tensors: a stored checkpoint's, or a merge computed on the fly."""
    if candidate.kind == "checkpoint":
        return open_checkpoint(candidate.inputs[0].uri, storage).iter_tensors()
    return prepare(candidate.plan, opener=lambda uri: open_checkpoint(uri, storage)).stream()


def materialize(candidate: Candidate, storage: StorageSpec, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Build the candidate as an in-memory HF model on `device`; returns (model, sparsity).

    Sparsity is the bf16 sparsity of the candidate's update against the base, measured while
    the tensors stream in.
    """
    base = open_checkpoint(candidate.base.uri, storage)
    counts = [0, 0]

    def measure(name: str, tensor: torch.Tensor) -> None:
        counts[0] += int(geometry.changed_bf16(base.get(name), tensor).sum())
        counts[1] += tensor.numel()

    model = build_model(base.config, candidate_tensors(candidate, storage), device, dtype, on_tensor=measure)
    changed, numel = counts
    return model, (1.0 - changed / numel if numel else 1.0)


def eval_settings(spec: EvalSpec) -> EvalSettings:
    return EvalSettings(
        limit=spec.limit, batch_size=spec.batch_size, max_length=spec.max_length, device=spec.device,
        num_samples=spec.num_samples, temperature=spec.temperature, top_p=spec.top_p,
        max_gen_toks=spec.max_gen_toks, pass_k=tuple(spec.pass_k), data_files=dict(spec.data_files),
        math_timeout=spec.math_timeout,
        sandbox=SandboxLimits(wall_seconds=spec.code_timeout, minimum_isolation=spec.code_isolation),
        chat_template=spec.chat_template, system_prompt=spec.system_prompt, instruction=spec.instruction,
        fewshot_as_multiturn=spec.fewshot_as_multiturn, think_tags=tuple(spec.think_tags) if spec.think_tags else None,
    )


def evaluate_candidate(candidate: Candidate, spec: EvalSpec, storage: StorageSpec) -> CandidateResult:
    """Materialise the candidate and score it with lm-eval and the verifiers.

    Everything that can refuse is checked first (tasks, sandbox, chat template, CUDA). With
    `backend: hf` the model is built in this process on `evaluation.device` (the worker's GPU:
    cuda is the first device of its CUDA_VISIBLE_DEVICES) in `evaluation.dtype`, and freed before
    the next candidate; with `served` the candidate is written to a local folder (under TMPDIR)
    and scored through a server started for it (`mergeaudit.evaluation.served`), then removed."""
    settings = eval_settings(spec)
    tasks = check_tasks(spec.tasks, settings.data_files)
    if any(t.verifier == "code" for t in tasks):
        require_isolation(spec.code_isolation)  # here, where the code runs, before building the model
    tokenizer = load_tokenizer(candidate.base.uri)  # the candidate is scored with its base's tokenizer
    check_prompting(tasks, settings, tokenizer, candidate.name)
    if spec.device.startswith("cuda") and not torch.cuda.is_available():
        raise EvaluationError(f"evaluation.device is {spec.device} but this worker has no CUDA device "
                              f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    if spec.backend == "served":
        from mergeaudit.evaluation.served import evaluate_served

        with tempfile.TemporaryDirectory(prefix="mergeaudit-served-") as tmp:
            base = open_checkpoint(candidate.base.uri, storage)
            sparsity = save_candidate(candidate, storage, base, tmp)
            result = evaluate_served(tmp, spec.tasks, settings, server_settings(spec))
    else:
        model, sparsity = materialize(candidate, storage, device=spec.device, dtype=getattr(torch, spec.torch_dtype))
        try:
            with torch.inference_mode():
                result = evaluate_model(model, tokenizer, spec.tasks, settings)
        finally:
            del model
            release_device_memory(spec.device)
    for row in result.scores + result.samples:
        row["candidate_id"] = candidate.candidate_id
    return CandidateResult(candidate_id=candidate.candidate_id, scores=result.scores, samples=result.samples,
                           update_sparsity_bf16=sparsity)


def server_settings(spec: EvalSpec):
    from mergeaudit.evaluation.served import ServerSettings

    s = spec.server
    return ServerSettings(engine=spec.engine, startup_timeout=s.startup_timeout, request_timeout=s.request_timeout,
                          num_concurrent=s.num_concurrent, dtype=spec.torch_dtype,
                          device=spec.device if spec.engine == "transformers" else "auto",
                          gpu_memory_utilization=s.gpu_memory_utilization, max_model_len=s.max_model_len,
                          extra_args=tuple(s.extra_args))


def release_device_memory(device: str) -> None:
    """Give a freed model's GPU memory back before the next candidate is built."""
    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def save_candidate(candidate: Candidate, storage: StorageSpec, base: Checkpoint, out_dir: str) -> float:
    """Write the candidate as a local checkpoint (for backends that load from disk)."""
    counts = [0, 0]

    def tensors():
        for name, tensor in candidate_tensors(candidate, storage):
            counts[0] += int(geometry.changed_bf16(base.get(name), tensor).sum())
            counts[1] += tensor.numel()
            yield name, tensor

    write_checkpoint(out_dir, tensors(), source=base)
    return 1.0 - counts[0] / counts[1] if counts[1] else 1.0


def candidate_rows(candidates: list[Candidate], results: list[CandidateResult],
                   failures: dict[str, str] | None = None) -> list[dict]:
    sparsity = {r.candidate_id: r.update_sparsity_bf16 for r in results}
    failures = failures or {}
    return [
        {
            "candidate_id": c.candidate_id,
            "name": c.name,
            "kind": c.kind,
            "method": c.method,
            "params_json": json.dumps(c.params, sort_keys=True),
            "params_hash": c.params_hash,
            "input_names": [r.name for r in c.inputs],
            "input_uris": [r.uri for r in c.inputs],
            "input_fingerprints": [r.fingerprint for r in c.inputs],
            "update_sparsity_bf16": sparsity.get(c.candidate_id),
            "mergeaudit_version": mergeaudit.__version__,
            "status": "failed" if c.candidate_id in failures else "ok",
            "error": failures.get(c.candidate_id),
            **_probe_columns(c.probe),
        }
        for c in candidates
    ]


def _probe_columns(probe: dict[str, Any] | None) -> dict[str, Any]:
    if not probe:
        return {}
    return {"probe_family": probe["family"], "probe_path": probe["path"], "probe_x": float(probe["x"]),
            "probe_seed": probe.get("seed")}


def checkpoint_rows(config: AuditConfig, records: dict[str, CheckpointRecord]) -> list[dict]:
    def role(name: str, r: CheckpointRecord) -> str:
        return "base" if name == config.base.name else "series_step" if r.series else "model"

    return [{"name": r.name, "role": role(name, r), "kind": r.kind, "uri": r.uri,
             "fingerprint": r.fingerprint, "n_tensors": r.n_tensors, "nbytes": r.nbytes, "model_type": r.model_type,
             "dtype": r.dtype} for name, r in records.items()]


class EvaluationRecord(pydantic.BaseModel):
    """Where one candidate's evaluation (scores and samples) was stored: the small record
    tasks and child flow runs pass around instead of the rows themselves."""

    candidate_id: str
    uri: str | None
    scores: int
    samples: int
    update_sparsity_bf16: float | None
    status: Literal["ok", "failed"] = "ok"
    error: str | None = None
    bytes_read: dict[str, int] = {}  # by input URI: what the evaluation read from the stores
    read_by: str | None = None  # the process that read them (store.process_tag())


def failed_evaluation(candidate: Candidate, error: str) -> EvaluationRecord:
    """The record of an evaluation that failed for good (after its retries)."""
    return EvaluationRecord(candidate_id=candidate.candidate_id, uri=None, scores=0, samples=0,
                            update_sparsity_bf16=None, status="failed", error=" ".join(error.split())[:2000])


def evaluation_key(candidate: Candidate, spec: EvalSpec) -> str:
    """Cache key of an evaluation: the candidate id (recipe + input fingerprints + version) and
    the evaluation settings."""
    return _digest({"candidate": candidate.candidate_id, "eval": spec.model_dump(mode="json"),
                    "version": mergeaudit.__version__})[:24]


def evaluate_to_store(candidate: Candidate, spec: EvalSpec, storage: StorageSpec, results_uri: str) -> EvaluationRecord:
    """Evaluate a candidate and store the result under RESULTS/evaluations/<key>.json; an
    evaluation already stored under that key (same inputs, settings and code) is reused."""
    uri = store.join(results_uri, "evaluations", f"{evaluation_key(candidate, spec)}.json")
    if store.exists(uri):
        return stored_evaluation(candidate, spec, results_uri)
    before = store.bytes_read()
    result = evaluate_candidate(candidate, spec, storage)
    store.write_bytes(uri, result.model_dump_json().encode())
    read = by_checkpoint(store.bytes_read_since(before), {r.uri for r in [candidate.base, *candidate.inputs]})
    return EvaluationRecord(candidate_id=candidate.candidate_id, uri=uri, scores=len(result.scores),
                            samples=len(result.samples), update_sparsity_bf16=result.update_sparsity_bf16,
                            bytes_read=read, read_by=store.process_tag())


def stored_evaluation(candidate: Candidate, spec: EvalSpec, results_uri: str) -> EvaluationRecord:
    """The record of an evaluation another process stored (a child flow run, say)."""
    uri = store.join(results_uri, "evaluations", f"{evaluation_key(candidate, spec)}.json")
    if not store.exists(uri):
        raise EvaluationError(f"the evaluation of {candidate.name} completed but {uri} is missing")
    result = CandidateResult.model_validate_json(store.read_bytes(uri))
    return EvaluationRecord(candidate_id=candidate.candidate_id, uri=uri, scores=len(result.scores),
                            samples=len(result.samples), update_sparsity_bf16=result.update_sparsity_bf16)


def load_evaluation(record: EvaluationRecord) -> CandidateResult:
    return CandidateResult.model_validate_json(store.read_bytes(record.uri))


class RunOutcome(pydantic.BaseModel):
    """What a finished run wrote, and what to show about it."""

    run_id: str
    results_uri: str
    tables: dict[str, str]
    summary: list[leaderboard.SummaryRow]
    failed: list[str] = []
    regressions: RegressionReport | None = None
    notes: list[str] = []  # what the summary must state besides scores (tensors geometry did not compare)
    bytes_read: dict[str, int] = {}  # by input name: read from its store by this run, in every process
    input_sizes: dict[str, int] = {}  # by input name: bytes of all its files

    def problems(self) -> str | None:
        """One paragraph on what went wrong (failed candidates, regressions), or None."""
        lines = [f"{len(self.failed)} candidate(s) failed: {', '.join(self.failed)}"] if self.failed else []
        if self.regressions and self.regressions.regressions:
            lines.append(self.regressions.summary())
        return "\n".join(lines) or None


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
    rows["runs"] = [run_row(config.name, started_at, config.model_dump_json(),
                            status="failed" if failures else "completed",
                            n_candidates=len(candidates), n_failed=len(failures),
                            previous_run_id=check.previous_run_id if check else None,
                            regressions_json=json.dumps([r.model_dump() for r in check.regressions]) if check else None)]
    files = tables.write_run(config.results_uri, run_id, f"{started_at:%Y-%m-%d}", rows, audit_name=config.name,
                             package_versions=package_versions())
    names = {c.candidate_id: c.name for c in candidates}
    return RunOutcome(run_id=run_id, results_uri=config.results_uri, tables=files,
                      summary=leaderboard.summary(run), failed=[names[cid] for cid in failures], regressions=check,
                      notes=geometry_views.not_compared(geometry_tables.get("geometry_tensors", [])),
                      bytes_read={} if bytes_read is None else input_totals(
                          {n: r.uri for n, r in checkpoints.items()}, bytes_read,
                          [e.bytes_read for e in evaluations if e.read_by != store.process_tag()]),
                      input_sizes={n: r.size for n, r in checkpoints.items() if r.size is not None})


def result_rows(
    config: AuditConfig,
    checkpoints: dict[str, CheckpointRecord],
    geometry_tables: dict[str, list[dict]],
    candidates: list[Candidate],
    results: list[CandidateResult],
    failures: dict[str, str] | None = None,
) -> dict[str, list[dict]]:
    """Every table's rows of one run but `runs`; scores and samples carry their candidate's
    name, method and parameter hash."""
    scores = [row for r in results for row in r.scores]
    samples = [row for r in results for row in r.samples]
    cands = candidate_rows(candidates, results, failures)
    run = RunResults(config.results_uri, "", {"candidates": cands, "scores": scores, "samples": samples,
                                              "checkpoints": checkpoint_rows(config, checkpoints)})
    probe_candidates, probe_scores = fragility.summarize(run)
    cands += [{**row, "mergeaudit_version": mergeaudit.__version__, "status": "ok"} for row in probe_candidates]
    by_id = {c["candidate_id"]: c for c in cands}

    def tag(row: dict, full: bool = True) -> dict:
        c = by_id.get(row["candidate_id"], {})
        extra = {"candidate": c.get("name")}
        if full:
            extra.update(method=c.get("method"), params_hash=c.get("params_hash"))
        return {**row, **extra}

    return {
        **geometry_tables,
        "checkpoints": checkpoint_rows(config, checkpoints),
        "candidates": cands,
        "scores": [tag(r) for r in scores + probe_scores],
        "samples": [tag(row, full=False) for row in samples],
    }


def run_row(audit_name: str, started_at: dt.datetime, config_json: str, status: str = "completed",
            **extra: Any) -> dict:
    """The `runs` row: what ran, when, with which configuration and package versions."""
    return {
        **extra,
        "audit_name": audit_name,
        "started_at": started_at,
        "finished_at": dt.datetime.now(dt.timezone.utc),
        "status": status,
        "config_json": config_json,
        "mergeaudit_version": mergeaudit.__version__,
        "package_versions": json.dumps(package_versions(), sort_keys=True),
    }
