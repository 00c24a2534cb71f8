"""Scoring one candidate, and the evaluation store: each evaluation's scores and samples kept
under RESULTS/evaluations/<key>.json, keyed by the candidate, the evaluation settings and the
code version, so a rerun (or a parent flow after its child runs) reuses what is stored."""

from __future__ import annotations

import os
import tempfile

import torch

import mergeaudit
from mergeaudit import store
from mergeaudit.audit.materialize import materialize, release_device_memory, save_candidate
from mergeaudit.audit.records import Candidate, CandidateResult, EvaluationRecord, digest
from mergeaudit.checkpoint.reads import by_checkpoint
from mergeaudit.checkpoint.settings import StorageSettings
from mergeaudit.errors import EvaluationError
from mergeaudit.evaluation import check_tasks, evaluate_model
from mergeaudit.evaluation.runner import check_prompting
from mergeaudit.evaluation.sandbox import require_isolation
from mergeaudit.evaluation.settings import EvalSettings
from mergeaudit.modeling import load_tokenizer


def evaluate_candidate(candidate: Candidate, settings: EvalSettings, storage: StorageSettings) -> CandidateResult:
    """Materialise the candidate and score it with lm-eval and the verifiers.

    Everything that can refuse is checked first (tasks, sandbox, chat template, CUDA). With
    `backend: hf` the model is built in this process on `evaluation.device` (the worker's GPU:
    cuda is the first device of its CUDA_VISIBLE_DEVICES) in `evaluation.dtype`, and freed before
    the next candidate; with `served` the candidate is written to a local folder (under TMPDIR)
    and scored through a server started for it (`mergeaudit.evaluation.served`), then removed."""
    tasks = check_tasks(settings.tasks, settings.data_files)
    if any(t.verifier == "code" for t in tasks):
        require_isolation(settings.code_isolation)  # here, where the code runs, before building the model
    tokenizer = load_tokenizer(candidate.base.uri)  # the candidate is scored with its base's tokenizer
    check_prompting(tasks, settings, tokenizer, candidate.name)
    if settings.device.startswith("cuda") and not torch.cuda.is_available():
        raise EvaluationError(
            f"evaluation.device is {settings.device} but this worker has no CUDA device "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
        )
    if settings.backend == "served":
        from mergeaudit.evaluation.served import evaluate_served

        with tempfile.TemporaryDirectory(prefix="mergeaudit-served-") as tmp:
            sparsity = save_candidate(candidate, storage, tmp)
            result = evaluate_served(tmp, settings.tasks, settings, settings.served())
    else:
        model, sparsity = materialize(
            candidate, storage, device=settings.device, dtype=getattr(torch, settings.torch_dtype)
        )
        try:
            with torch.inference_mode():
                result = evaluate_model(model, tokenizer, settings.tasks, settings)
        finally:
            del model
            release_device_memory(settings.device)
    for row in result.scores + result.samples:
        row["candidate_id"] = candidate.candidate_id
    return CandidateResult(
        candidate_id=candidate.candidate_id, scores=result.scores, samples=result.samples, update_sparsity_bf16=sparsity
    )


def evaluation_key(candidate: Candidate, settings: EvalSettings) -> str:
    """Cache key of an evaluation: the candidate id (recipe + input fingerprints + version) and
    the evaluation settings."""
    return digest(
        {
            "candidate": candidate.candidate_id,
            "eval": settings.model_dump(mode="json"),
            "version": mergeaudit.__version__,
        }
    )[:24]


def evaluation_uri(results_uri: str, candidate: Candidate, settings: EvalSettings) -> str:
    return store.join(results_uri, "evaluations", f"{evaluation_key(candidate, settings)}.json")


def evaluate_to_store(
    candidate: Candidate, settings: EvalSettings, storage: StorageSettings, results_uri: str
) -> EvaluationRecord:
    """Evaluate a candidate and store the result under RESULTS/evaluations/<key>.json; an
    evaluation already stored under that key (same inputs, settings and code) is reused."""
    uri = evaluation_uri(results_uri, candidate, settings)
    if store.exists(uri):
        return stored_evaluation(candidate, settings, results_uri)
    before = store.bytes_read()
    result = evaluate_candidate(candidate, settings, storage)
    store.write_bytes(uri, result.model_dump_json().encode())
    read = by_checkpoint(store.bytes_read_since(before), {r.uri for r in [candidate.base, *candidate.inputs]})
    return _record(uri, result, bytes_read=read, read_by=store.process_tag())


def stored_evaluation(candidate: Candidate, settings: EvalSettings, results_uri: str) -> EvaluationRecord:
    """The record of an evaluation another process stored (a child flow run, say)."""
    uri = evaluation_uri(results_uri, candidate, settings)
    if not store.exists(uri):
        raise EvaluationError(f"the evaluation of {candidate.name} completed but {uri} is missing")
    result = CandidateResult.model_validate_json(store.read_bytes(uri))
    return _record(uri, result)


def _record(uri: str, result: CandidateResult, **read) -> EvaluationRecord:
    return EvaluationRecord(
        candidate_id=result.candidate_id,
        uri=uri,
        scores=len(result.scores),
        samples=len(result.samples),
        update_sparsity_bf16=result.update_sparsity_bf16,
        **read,
    )


def load_evaluation(record: EvaluationRecord) -> CandidateResult:
    return CandidateResult.model_validate_json(store.read_bytes(record.uri))


def failed_evaluation(candidate: Candidate, error: str) -> EvaluationRecord:
    """The record of an evaluation that failed for good (after its retries)."""
    return EvaluationRecord(
        candidate_id=candidate.candidate_id,
        uri=None,
        scores=0,
        samples=0,
        update_sparsity_bf16=None,
        status="failed",
        error=" ".join(error.split())[:2000],
    )
