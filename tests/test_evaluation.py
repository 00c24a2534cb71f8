"""Evaluation: verifiers, the shipped task packs, and the real lm-eval wiring end to end."""

from __future__ import annotations

import json

import pytest
import yaml

from mergeaudit.errors import EvaluationError
from mergeaudit.evaluation import EvalSettings, check_tasks, shipped_tasks
from mergeaudit.evaluation.arithmetic import make_problems
from mergeaudit.evaluation.packs import code_problems, expected_packs, word_problems
from mergeaudit.evaluation.runner import TASKS_DIR, evaluate_lm, materialize_tasks, pass_at_k
from mergeaudit.evaluation.verifiers import (
    MathVerifier,
    Verifier,
    check_format,
    extract_answer,
    numeric_match,
    verify_numeric,
)
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
        ("42", "Natalia sold 24 + 18 = 42 clips.\n#### 42", True),
        ("67", "68", False),
        ("", "68", False),
        ("sixty-eight", "68", False),
    ],
)
def test_numeric_verifier(completion, reference, correct):
    assert verify_numeric(completion, reference).correct is correct
    assert numeric_match([reference], [completion]) == (1.0 if correct else 0.0)


def test_extraction_and_format_checks():
    assert extract_answer("1 then \\boxed{2} then 3") == "2"
    assert extract_answer("1 #### 2\n 3") == "2"
    assert extract_answer("1 and 2 and 3") == "3"
    assert check_format("x \\boxed{3}", "boxed") and not check_format("3", "boxed")
    assert check_format("#### 3", "hash") and check_format("3\n", "number") and not check_format("three", "number")


@pytest.mark.integration
def test_math_verifier_and_its_hard_deadline():
    with Verifier() as v:
        assert v.verify("math", "so \\boxed{\\frac{1}{2}}", "0.5").correct
        assert not v.verify("math", "\\boxed{3}", "4").correct
    slow = MathVerifier(timeout=0.001)  # no worker can even start in time: a recorded timeout
    verdict = slow.verify("\\boxed{2}", "2")
    assert not verdict.correct and "timed out" in verdict.error
    slow.timeout = 30
    assert slow.verify("\\boxed{2}", "2").correct, "a new worker replaces the killed one"
    slow.close()


def test_math_verify_runs_under_prefect_worker_threads(prefect_harness):
    from prefect import flow, task
    from prefect.task_runners import ThreadPoolTaskRunner

    @task
    def check(completion: str, reference: str) -> bool:
        with Verifier() as v:
            verdict = v.verify("math", completion, reference)
        assert verdict.error is None, verdict.error
        return verdict.correct

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=2))
    def verify_many() -> list[bool]:
        futures = [check.submit("\\boxed{4}", "4"), check.submit("\\boxed{5}", "4")]
        return [f.result() for f in futures]

    assert verify_many() == [True, False]


def test_shipped_packs_match_their_generators():
    for rel, rows in expected_packs().items():
        shipped = [json.loads(line) for line in (TASKS_DIR / rel).read_text().splitlines()]
        assert shipped == rows, rel
    assert len(word_problems()) == 50 and len(code_problems()) == 12


def test_every_shipped_task_resolves_and_loads_in_lm_eval(tmp_path):
    from lm_eval.tasks import TaskManager

    data = tmp_path / "data"
    data.mkdir()
    (data / "gsm8k.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "2\n#### 2"}) + "\n")
    (data / "math500.jsonl").write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n")
    (data / "aime.jsonl").write_text(json.dumps({"ID": "1", "Question": "1+1?", "Answer": "2"}) + "\n")
    (data / "humaneval.jsonl").write_text(json.dumps(code_problems()[0] | {"task_id": "h/0"}) + "\n")
    files = {k: str(data / f"{k}.jsonl") for k in ("gsm8k", "math500", "aime", "humaneval")}
    names = sorted(shipped_tasks())
    tasks = check_tasks(names, files)
    folder = materialize_tasks(tasks, tmp_path / "tasks", num_samples=2)
    for task in tasks:
        cfg = yaml.safe_load((folder / f"{task.name}.yaml").read_text().replace("!function", ""))
        assert all(p.startswith("/") for p in cfg["dataset_kwargs"]["data_files"].values())
        assert cfg["repeats"] == 2
    loaded = TaskManager(include_path=str(folder), include_defaults=False).load(names)["tasks"]
    assert set(loaded) == set(names)
    assert {t.verifier for t in tasks} == {"numeric", "math", "code"}


@pytest.mark.slow
def test_unknown_tasks_and_missing_data_fail_before_any_model(tmp_path):
    with pytest.raises(EvaluationError, match="did you mean mergeaudit_add2"):
        check_tasks(["mergeaudit_ad2"])
    with pytest.raises(EvaluationError, match="did you mean .*gsm8k"):
        check_tasks(["gsm8kk"])
    with pytest.raises(EvaluationError, match="evaluation.data_files.gsm8k, which is not set"):
        check_tasks(["mergeaudit_gsm8k_local"])
    with pytest.raises(EvaluationError, match="data file .*nope.jsonl is missing"):
        check_tasks(["mergeaudit_gsm8k_local"], {"gsm8k": str(tmp_path / "nope.jsonl")})


def answers(correct: int, n: int = 100) -> dict[str, str]:
    problems = make_problems("add", 2, n, seed=2026)
    return {p["question"]: (p["answer"] if i < correct else "0") for i, p in enumerate(problems)}


def metrics(result, task: str = "mergeaudit_add2") -> dict[str, dict]:
    return {r["metric"]: r for r in result.scores if r["task"] == task}


def test_lm_eval_and_the_verifier_score_an_oracle_exactly():
    result = evaluate_lm(TableLM(answers(100)), ["mergeaudit_add2"], EvalSettings(limit=20))
    m = metrics(result)
    assert m["exact_match"]["value"] == 1.0 and m["numeric_match"]["value"] == 1.0
    assert m["pass@1"]["value"] == 1.0 and m["format_rate"]["value"] == 1.0
    assert m["verifier_errors"]["value"] == 0 and m["exact_match"]["n"] == 20
    assert len(result.samples) == 20 and all(s["verdict"] for s in result.samples)
    assert {s["prompt_hash"] is not None for s in result.samples} == {True}


def test_a_partial_oracle():
    # the first 10 of 20 documents are answered right; leading spaces are ignored by both metrics
    result = evaluate_lm(
        TableLM({q: " " + a for q, a in answers(10).items()}), ["mergeaudit_add2"], EvalSettings(limit=20)
    )
    m = metrics(result)
    assert m["exact_match"]["value"] == pytest.approx(0.5)
    assert m["numeric_match"]["value"] == pytest.approx(0.5)
    assert m["numeric_match"]["stderr"] == pytest.approx((0.25 * 20 / 19 / 20) ** 0.5)


def test_sampling_and_unbiased_pass_at_k():
    assert pass_at_k(4, 2, 1) == pytest.approx(0.5) and pass_at_k(4, 2, 2) == pytest.approx(5 / 6)
    assert pass_at_k(4, 0, 2) == 0 and pass_at_k(4, 3, 2) == 1
    problems = make_problems("add", 2, 100, seed=2026)[:6]
    table = {p["question"]: [p["answer"], "0", p["answer"], "1"] for p in problems}  # 2 of 4 right
    settings = EvalSettings(limit=6, num_samples=4, temperature=0.8, pass_k=(1, 2, 4))
    result = evaluate_lm(TableLM(table), ["mergeaudit_add2"], settings)
    m = metrics(result)
    assert m["pass@1"]["value"] == pytest.approx(0.5)
    assert m["pass@2"]["value"] == pytest.approx(5 / 6)
    assert m["pass@4"]["value"] == pytest.approx(1.0)
    assert len(result.samples) == 24 and sorted({s["sample"] for s in result.samples}) == [0, 1, 2, 3]


@pytest.mark.integration
def test_code_pack_runs_completions_in_the_sandbox():
    rows = code_problems()
    good = {r["prompt"]: r["canonical_solution"] for r in rows}
    bad = {r["prompt"]: "    import os\n    os.system('true')\n" for r in rows}
    ok = metrics(evaluate_lm(TableLM(good), ["mergeaudit_code_mini"], EvalSettings()), "mergeaudit_code_mini")
    assert ok["code_pass"]["value"] == 1.0 and ok["verifier_errors"]["value"] == 0
    result = evaluate_lm(TableLM(bad), ["mergeaudit_code_mini"], EvalSettings(limit=3))
    denied = metrics(result, "mergeaudit_code_mini")
    assert denied["code_pass"]["value"] == 0.0 and denied["verifier_errors"]["value"] == 3
    assert all(s["extracted"] == "denied" and "denied" in s["error"] for s in result.samples)


def test_tiny_model_through_hflm(toy_family):
    from mergeaudit.checkpoint import Checkpoint
    from mergeaudit.evaluation import evaluate_model
    from mergeaudit.modeling import build_model, load_tokenizer

    ck = Checkpoint.open(toy_family.base)
    result = evaluate_model(
        build_model(ck.config, ck.iter_tensors()),
        load_tokenizer(ck.uri),
        ["mergeaudit_add2", "mergeaudit_word_problems"],
        EvalSettings(limit=4, batch_size=4),
    )
    assert {(r["task"], r["metric"]) for r in result.scores} >= {
        ("mergeaudit_add2", "numeric_match"),
        ("mergeaudit_word_problems", "pass@1"),
    }
    assert len(result.samples) == 8
