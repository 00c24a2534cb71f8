"""The stages of a merge audit as plain library functions; the Prefect flow only chains them.

    config = load_config("audit.yaml")
    records = resolve_checkpoints(config)            # open + validate, no tensor read
    geo = compute_geometry(config, records)           # streamed, per tensor and model
    cands = plan_candidates(config, records)          # small, serialisable recipes
    results = [evaluate_candidate(c, config.evaluation) for c in cands]
    write_results(config, run_id, ...)                # Parquet tables

Stages exchange URIs and small records (pydantic models), never tensors or models: a recipe is
materialised next to where it is evaluated.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import json
import tempfile
import uuid
from pathlib import Path
from typing import Any, Literal

import pydantic
import torch

import mergeaudit
from mergeaudit import geometry, store, tables
from mergeaudit.checkpoint import TOKENIZER_FILES, Checkpoint, CheckpointCache, check_compatible
from mergeaudit.config import AuditConfig, EvalSpec, GeometrySpec, StorageSpec
from mergeaudit.errors import CheckpointError
from mergeaudit.merging import REGISTRY, merge_stream

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


class Candidate(pydantic.BaseModel):
    """Something we score: a stored checkpoint, or a merge recipe of named checkpoints."""

    model_config = pydantic.ConfigDict(frozen=True)
    candidate_id: str
    name: str
    kind: Literal["checkpoint", "merge"]
    method: str | None = None
    params: dict[str, Any] = {}
    inputs: list[CheckpointRecord]
    base: CheckpointRecord

    @property
    def params_hash(self) -> str:
        return _digest(self.params)[:16]


class CandidateResult(pydantic.BaseModel):
    """What evaluating one candidate produced: score rows and its update's bf16 sparsity."""

    candidate_id: str
    scores: list[dict[str, Any]]
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
    """Open a checkpoint through the configured read-through cache, if any."""
    cache = None
    if storage.cache_dir:
        cache = CheckpointCache(storage.cache_dir, max_bytes=int(storage.cache_max_gb * 1024**3))
    return Checkpoint.open(uri, cache=cache)


def resolve_checkpoints(config: AuditConfig) -> dict[str, CheckpointRecord]:
    """Open every checkpoint (headers only) and check names and shapes agree with the base."""
    opened = {spec.name: Checkpoint.open(spec.uri) for spec in [config.base, *config.models]}
    marker = config.storage.completion_marker
    unmarked = [ck.uri for ck in opened.values() if marker and marker not in ck.files]
    if unmarked:
        raise CheckpointError(f"incomplete checkpoints (no {marker}): {', '.join(unmarked)}")
    check_compatible(opened[config.base.name], [opened[m.name] for m in config.models])
    kinds = {config.base.name: "base", **{m.name: m.kind for m in config.models}}
    return {
        name: CheckpointRecord(name=name, uri=ck.uri, kind=kinds[name], fingerprint=ck.fingerprint,
                               n_tensors=len(ck.keys()), nbytes=ck.nbytes)
        for name, ck in opened.items()
    }


def geometry_settings(spec: GeometrySpec) -> geometry.GeometrySettings:
    spectral = geometry.SpectralSettings(top_k_fraction=spec.top_k_fraction, exact_max_dim=spec.exact_max_dim)
    return geometry.GeometrySettings(eta=spec.eta, abs_tol=spec.abs_tol, spectral=spectral if spec.spectral else None)


def compute_geometry(config: AuditConfig, records: dict[str, CheckpointRecord]) -> dict[str, list[dict]]:
    """geometry_tensors and geometry_pairs rows for every fine-tuned model against the base."""
    base = open_checkpoint(records[config.base.name].uri, config.storage)
    models = {m.name: open_checkpoint(records[m.name].uri, config.storage) for m in config.models}
    kinds = {m.name: m.kind for m in config.models}
    tensor_rows, pair_rows = geometry.compute_geometry(base, models, kinds, geometry_settings(config.geometry))
    return {"geometry_tensors": tensor_rows, "geometry_pairs": pair_rows}


def plan_candidates(config: AuditConfig, records: dict[str, CheckpointRecord]) -> list[Candidate]:
    """The references (base and fine-tunes, when score_inputs) and one merge per grid point."""
    base = records[config.base.name]
    out: list[Candidate] = []
    if config.score_inputs:
        for spec in [config.base, *config.models]:
            rec = records[spec.name]
            cid = _digest({"kind": "checkpoint", "fingerprint": rec.fingerprint})[:20]
            out.append(Candidate(candidate_id=cid, name=spec.name, kind="checkpoint", inputs=[rec], base=base))
    for strat in config.strategies:
        names = config.strategy_models(strat)
        inputs = [records[n] for n in names]
        for point in strat.points():
            params = REGISTRY.parse_params(strat.method, point, n_models=len(inputs), has_base=True)
            dumped = params.model_dump(mode="json", by_alias=True)
            recipe = {"method": strat.method, "params": dumped, "base": base.fingerprint,
                      "inputs": [r.fingerprint for r in inputs], "version": mergeaudit.__version__}
            cid = _digest(recipe)[:20]
            label = ",".join(f"{k}={v}" for k, v in sorted(point.items())) if point else ""
            name = f"{strat.method}({'+'.join(names)}{'; ' + label if label else ''})"
            out.append(Candidate(candidate_id=cid, name=name, kind="merge", method=strat.method,
                                 params=dumped, inputs=inputs, base=base))
    seen: set[str] = set()
    return [c for c in out if not (c.candidate_id in seen or seen.add(c.candidate_id))]


def candidate_tensors(candidate: Candidate, storage: StorageSpec):
    """Stream the candidate's tensors: a stored checkpoint's, or a merge computed on the fly."""
    if candidate.kind == "checkpoint":
        return open_checkpoint(candidate.inputs[0].uri, storage).iter_tensors()
    base = open_checkpoint(candidate.base.uri, storage)
    models = [open_checkpoint(r.uri, storage) for r in candidate.inputs]
    params = REGISTRY.parse_params(candidate.method, candidate.params, n_models=len(models), has_base=True)
    return merge_stream(candidate.method, params, base, models)


def load_tokenizer(uri: str):
    """The tokenizer of a checkpoint on any store (its small files copied to a temp folder)."""
    from transformers import AutoTokenizer

    ck_files = store.list_files(uri)
    with tempfile.TemporaryDirectory(prefix="mergeaudit-tok-") as tmp:
        for name in TOKENIZER_FILES + ("config.json",):
            if name in ck_files:
                (Path(tmp) / name).write_bytes(store.read_bytes(ck_files[name].uri))
        return AutoTokenizer.from_pretrained(tmp, trust_remote_code=False)


def materialize(candidate: Candidate, storage: StorageSpec, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Build the candidate as an in-memory HF model on `device`; returns (model, tokenizer, sparsity).

    The architecture comes from the base's config.json through transformers' built-in classes
    only (trust_remote_code stays off). Sparsity is the bf16 sparsity of the candidate's update
    against the base, measured while the tensors stream in.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    base = open_checkpoint(candidate.base.uri, storage)
    cfg = dict(base.config)
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise CheckpointError(f"{base.uri}/config.json has no model_type")
    hf_config = AutoConfig.for_model(model_type, **cfg)
    # Allocated on the target device without random init; weights are copied in as they stream,
    # so memory holds the model plus one tensor, never a second copy of the state dict.
    with no_init_weights(), torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, trust_remote_code=False)
    targets = model.state_dict(keep_vars=True)
    tied = {"lm_head.weight"} if getattr(hf_config, "tie_word_embeddings", False) else set()
    loaded: set[str] = set()
    changed, numel = 0, 0
    with torch.no_grad():
        for name, tensor in candidate_tensors(candidate, storage):
            if name not in targets:
                raise CheckpointError(f"{base.uri}: tensor {name!r} does not fit {type(model).__name__}")
            if tuple(targets[name].shape) != tuple(tensor.shape):
                raise CheckpointError(f"{base.uri}: tensor {name!r} has shape {list(tensor.shape)}, "
                                      f"{type(model).__name__} wants {list(targets[name].shape)}")
            changed += int(geometry.changed_bf16(base.get(name), tensor).sum())
            numel += tensor.numel()
            targets[name].copy_(tensor)
            loaded.add(name)
    missing = set(targets) - loaded - tied
    if missing:
        raise CheckpointError(f"{base.uri}: weights missing for {type(model).__name__}: {sorted(missing)[:5]}")
    if tied and "lm_head.weight" not in loaded:
        model.tie_weights()
    model.eval()
    tokenizer = load_tokenizer(base.uri)
    return model, tokenizer, (1.0 - changed / numel if numel else 1.0)


def evaluate_candidate(candidate: Candidate, spec: EvalSpec, storage: StorageSpec) -> CandidateResult:
    """Materialise the candidate and score it with lm-eval on the configured tasks."""
    from mergeaudit.evaluation import EvalSettings, evaluate_model

    model, tokenizer, sparsity = materialize(candidate, storage, device=spec.device)
    settings = EvalSettings(limit=spec.limit, batch_size=spec.batch_size, max_length=spec.max_length,
                            device=spec.device)
    with torch.inference_mode():
        rows = evaluate_model(model, tokenizer, spec.tasks, settings)
    for row in rows:
        row["candidate_id"] = candidate.candidate_id
    return CandidateResult(candidate_id=candidate.candidate_id, scores=rows, update_sparsity_bf16=sparsity)


def candidate_rows(candidates: list[Candidate], results: list[CandidateResult]) -> list[dict]:
    sparsity = {r.candidate_id: r.update_sparsity_bf16 for r in results}
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
        }
        for c in candidates
    ]


def write_results(
    config: AuditConfig,
    run_id: str,
    started_at: dt.datetime,
    geometry_tables: dict[str, list[dict]],
    candidates: list[Candidate],
    results: list[CandidateResult],
) -> dict[str, str]:
    """Write the run's tables (runs last); returns table -> file URI."""
    run = run_row(config.name, started_at, config.model_dump_json())
    return tables.write_run(
        config.results_uri,
        run_id,
        f"{started_at:%Y-%m-%d}",
        {
            **geometry_tables,
            "candidates": candidate_rows(candidates, results),
            "scores": [row for r in results for row in r.scores],
            "runs": [run],
        },
    )


def run_row(audit_name: str, started_at: dt.datetime, config_json: str, status: str = "completed") -> dict:
    """The `runs` row: what ran, when, with which configuration and package versions."""
    return {
        "audit_name": audit_name,
        "started_at": started_at,
        "finished_at": dt.datetime.now(dt.timezone.utc),
        "status": status,
        "config_json": config_json,
        "mergeaudit_version": mergeaudit.__version__,
        "package_versions": json.dumps(package_versions(), sort_keys=True),
    }


def summary_rows(config: AuditConfig, candidates: list[Candidate], results: list[CandidateResult]) -> list[dict]:
    """One line per candidate: name, method, the first task's first metric, update sparsity."""
    by_id = {r.candidate_id: r for r in results}
    task = config.evaluation.tasks[0]
    out = []
    for c in candidates:
        res = by_id.get(c.candidate_id)
        scores = [s for s in (res.scores if res else []) if s["task"] == task]
        main = next((s for s in scores if s["metric"] != "exact_match"), scores[0] if scores else None)
        out.append({
            "candidate": c.name,
            "method": c.method or c.kind,
            "metric": f"{task}/{main['metric']}" if main else None,
            "score": main["value"] if main else None,
            "stderr": main["stderr"] if main else None,
            "update_sparsity_bf16": res.update_sparsity_bf16 if res else None,
        })
    return out
