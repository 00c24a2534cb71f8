"""Every verifier call is bounded, and a timeout is recorded as one, never as a wrong answer.

Issue 13: `\\boxed{1e999999999}` kept the numeric verifier busy for minutes (it built an exact
10**999999999); math-verify's own timeouts came back as a silent False. Each bomb here runs
under a wall-clock bound measured by the test.
"""

from __future__ import annotations

import time
from fractions import Fraction

import pytest

from mergeaudit import tables
from mergeaudit.evaluation.runner import TaskSource
from mergeaudit.evaluation.verdicts import verify_samples
from mergeaudit.evaluation.verifiers import (
    MAX_DIGITS,
    MAX_EXPONENT,
    MathVerifier,
    Verdict,
    Verifier,
    check_format,
    numeric_match,
    parse_number,
    verify_numeric,
)

BOMBS = [
    "\\boxed{1e999999999}",
    "\\boxed{-1E+999999999999999999999}",
    "\\boxed{1e-999999999}/\\boxed{3}",
    "\\boxed{" + "9" * 1_000_000 + "}",
    "#### " + "1," * 300_000,
    "\\boxed{" * 100_000,
    "\\boxed{" + "{" * 200_000 + "}" * 200_000 + "}",
    "3/" + "7" * 500_000,
    "1" * 1_000_000,
]


@pytest.mark.parametrize("completion", BOMBS, ids=[f"bomb{i}" for i in range(len(BOMBS))])
def test_numeric_bombs_are_refused_quickly(completion):
    start = time.monotonic()
    verdict = verify_numeric(completion, "68")
    assert numeric_match(["68"], [completion]) == 0.0
    check_format(completion, "number")
    check_format(completion, "boxed")
    # a guard against a parse that never ends (quadratic regexes, huge integers: minutes), not a
    # speed test: it took ~0.1 s, and 2 s flaked on a loaded 2-core machine
    assert time.monotonic() - start < 30.0
    assert not verdict.correct and verdict.status in ("wrong", "no_answer")


def test_number_bounds_are_checked_on_the_text():
    assert parse_number("2.5e3") == 2500 and parse_number("1,234") == 1234 and parse_number("7/8") == Fraction(7, 8)
    assert parse_number("9" * MAX_DIGITS) == int("9" * MAX_DIGITS)
    assert parse_number("9" * (MAX_DIGITS + 1)) is None
    assert parse_number(f"1e{MAX_EXPONENT}") == 10**MAX_EXPONENT
    assert parse_number(f"1e{MAX_EXPONENT + 1}") is None and parse_number(f"1e-{MAX_EXPONENT + 1}") is None
    assert parse_number("1/0") is None and parse_number("nan") is None and parse_number("inf") is None
    assert verify_numeric("\\boxed{6.8e1}", "68").correct


def test_verdicts_say_what_happened():
    assert Verdict(True, "1").status == "correct"
    assert Verdict(False, "2").status == "wrong"
    assert Verdict(False, None).status == "no_answer"
    assert Verdict(False, None, error="timeout: slow").status == "timeout"
    assert Verdict(False, None, error="math-verify failed: boom").status == "error"
    with pytest.raises(ValueError):
        Verdict(False, None, status="maybe")


@pytest.mark.integration
def test_math_verify_internal_timeouts_are_recorded():
    """math-verify gives up on comparing 5 with 10^(10^10) after its SIGALRM timeout and, by
    default, returns False: before, a plain wrong answer with no error."""
    verifier = MathVerifier(timeout=60, step_timeout=1)
    try:
        assert verifier.verify("\\boxed{5}", "5").correct
        start = time.monotonic()
        verdict = verifier.verify("\\boxed{10^{10^{10}}}", "5")
        assert time.monotonic() - start < 15
        assert verdict.status == "timeout" and not verdict.correct, verdict
        assert verdict.error.startswith("timeout: math-verify's comparison")
        wrong = verifier.verify("\\boxed{4}", "5")
        assert wrong.status == "wrong" and wrong.error is None
    finally:
        verifier.close()


@pytest.mark.integration
def test_the_hard_deadline_holds_when_math_verify_does_not_give_up():
    verifier = MathVerifier(timeout=2, step_timeout=600)
    try:
        start = time.monotonic()
        verdict = verifier.verify("\\boxed{10^{10^{10}}}", "5")
        assert time.monotonic() - start < 15
        assert verdict.status == "timeout" and verdict.error.startswith("timeout: math-verify timed out after 2 s")
    finally:
        verifier.close()


@pytest.mark.integration
def test_timeouts_are_counted_apart_in_the_scores_and_samples():
    task = TaskSource("bombs", {}, None, verifier="math")  # origin unused by verify_samples
    logged = [
        {
            "doc_id": 0,
            "target": "5",
            "resps": [["\\boxed{10^{10^{10}}}", "\\boxed{5}", "\\boxed{4}"]],
            "doc": {},
            "prompt_hash": "h",
        }
    ]
    verifier = Verifier(math_timeout=60)
    verifier.math.step_timeout = 1
    with verifier:
        samples, scores = verify_samples(task, logged, verifier, (1,))
    metrics = {s["metric"]: s["value"] for s in scores}
    assert metrics["math_verify"] == pytest.approx(1 / 3)
    assert metrics["verifier_timeouts"] == 1 and metrics["verifier_errors"] == 1
    assert samples[0]["error"].startswith("timeout:") and samples[0]["verdict"] is False
    assert samples[1]["error"] is None and samples[2]["error"] is None
    assert [r["status"] for r in samples] == ["timeout", "correct", "wrong"]
    table = tables.to_arrow("samples", [{"candidate_id": "c", **r} for r in samples])
    assert table.column("status").to_pylist() == ["timeout", "correct", "wrong"]
