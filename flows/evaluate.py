"""The evaluate flow: score one candidate; deployed as `evaluate/gpu` on the `gpu` work pool.

The parent audit starts one run per candidate with `run_deployment` when `routing: pools`.
Parameters are small records (the candidate's recipe, the evaluation and storage settings, the
results URI); the scores and samples go to the store, and the run returns where. What the run
read from the inputs' stores goes to `RESULTS/evaluations/reads/<flow run id>.json`, for the
parent's bytes-read summary.
"""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from mergeaudit.audit import Candidate, EvaluationRecord
from mergeaudit.checkpoint import reads
from mergeaudit.checkpoint.settings import StorageSettings
from mergeaudit.evaluation.settings import EvalSettings
from mergeaudit.flows.credentials import use_storage_credentials
from mergeaudit.flows.lifetime import end_with_worker
from mergeaudit.tasks.audit import evaluate_candidate


@flow(name="evaluate", log_prints=True)
def evaluate(
    candidate: Candidate, evaluation: EvalSettings, storage: StorageSettings, results_uri: str
) -> EvaluationRecord:
    """Evaluate one merge, probe or checkpoint candidate and store its scores and samples."""
    end_with_worker(flow_run.get_id())  # a stopped or killed worker does not leave it computing
    with use_storage_credentials(storage):  # this run's S3 credentials, not the process's
        record = evaluate_candidate(candidate, evaluation, storage, results_uri)
        reads.save_report(reads.report_uri(results_uri, str(flow_run.get_id())), record.bytes_read, record.read_by)
    return record
