"""Evaluation: verifiers, the shipped task pack, and the real lm-eval wiring."""

from __future__ import annotations

import json

import pytest
import yaml

from mergeaudit.errors import EvaluationError
from mergeaudit.evaluation import EvalSettings, check_tasks, shipped_tasks
from mergeaudit.evaluation.runner import evaluate_lm, materialize_tasks
from mergeaudit.evaluation.verifiers import (
    extract_answer,
    numeric_match,
    verify_numeric,
)
from mergeaudit.toy.arithmetic import make_problems
from tests.oracle import TableLM


@pytest.mark.parametrize(
    "completion,reference,correct",
    [
        ("68", "68", True),
        (" 68\n", "68", True),
        ("68.0", "68", True),
        ("1,234", "1234", True),
        ("so 3/4", "0.75", True),
        ("the answer is \\boxed{12} not 13", "12", True),
        ("work... #### 42", "42", True),
        ("67", "68", False),
        ("", "68", False),
        ("sixty-eight", "68", False),
    ],
)
def test_numeric_verifier(completion, reference, correct):
    assert verify_numeric(completion, reference).correct is correct
    assert numeric_match([reference], [completion]) == (1.0 if correct else 0.0)


def test_extraction_prefers_boxed_then_hashes_then_last_number():
    assert extract_answer("1 then \\boxed{2} then 3") == "2"
    assert extract_answer("1 #### 2\n 3") == "2"
    assert extract_answer("1 and 2 and 3") == "3"


def test_shipped_add2_matches_its_generator():
    task = shipped_tasks()["mergeaudit_add2"]
    rows = [json.loads(line) for line in task.data_files["test"].read_text().splitlines()]
    assert rows == make_problems("add", 2, 100, seed=2026)


def test_materialized_tasks_use_absolute_data_paths(tmp_path):
    (task,) = check_tasks(["mergeaudit_add2"])
    cfg = yaml.safe_load((materialize_tasks([task], tmp_path) / "mergeaudit_add2.yaml").read_text())
    path = cfg["dataset_kwargs"]["data_files"]["test"]
    assert path.startswith("/") and path.endswith("add2.jsonl")


def test_unknown_task_lists_close_matches():
    with pytest.raises(EvaluationError, match="did you mean mergeaudit_add2"):
        check_tasks(["mergeaudit_add"])


def _answers(correct: int) -> dict[str, str]:
    problems = make_problems("add", 2, 100, seed=2026)
    return {p["question"]: (p["answer"] if i < correct else "0") for i, p in enumerate(problems)}


def test_lm_eval_scores_an_oracle_exactly():
    lm = TableLM(_answers(correct=100))
    rows = {r["metric"]: r for r in evaluate_lm(lm, ["mergeaudit_add2"], EvalSettings(limit=20))}
    assert rows["exact_match"]["value"] == 1.0 and rows["numeric_match"]["value"] == 1.0
    assert rows["exact_match"]["n"] == 20 and len(lm.prompts) == 20


def test_lm_eval_scores_a_partial_oracle():
    # the first 10 of 20 documents are answered right; leading spaces are ignored by both metrics
    answers = {q: " " + a for q, a in _answers(correct=10).items()}
    rows = {r["metric"]: r for r in evaluate_lm(TableLM(answers), ["mergeaudit_add2"], EvalSettings(limit=20))}
    assert rows["exact_match"]["value"] == pytest.approx(0.5)
    assert rows["numeric_match"]["value"] == pytest.approx(0.5)
    assert rows["numeric_match"]["stderr"] == pytest.approx((0.25 / 19) ** 0.5)
