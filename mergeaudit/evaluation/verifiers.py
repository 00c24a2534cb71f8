"""Verifiers: decide whether a completion is correct, the same way wherever they are used.

- numeric: the answer a completion commits to (a `\\boxed{...}` answer first, then a `####`
  line, then its last number) equals the reference as an exact rational (`68` = `68.0`,
  `1,234` = `1234`, `3/4` = `0.75`);
- math: math-verify (boxed answer first) compares symbolically. math-verify times itself out
  with SIGALRM, which only works on a process's main thread (Prefect runs tasks in worker
  threads), so `MathVerifier` runs it in a spawned worker process, on that process's main
  thread, under our own hard deadline: a timeout kills the worker, scores 0 and is recorded in
  `Verdict.error`; it never crashes the run and is never silently a plain wrong answer;
- code: the program runs against its unit tests in `mergeaudit.evaluation.sandbox`;
- format: whether the completion has the shape the task asks for (a boxed answer, a `####`
  line, a bare number).

`Verifier` bundles them for a run (`with Verifier() as v: v.verify("math", completion, ref)`).
`numeric_match` keeps lm-eval's callable-metric signature for task YAMLs.
"""

from __future__ import annotations

import multiprocessing
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

from mergeaudit.evaluation.sandbox import SandboxLimits, run_code

Kind = Literal["numeric", "math", "code"]
_NUMBER_RE = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:/\d+)?|[-+]?\.\d+")
_BOXED_RE = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
_HASH_RE = re.compile(r"####\s*([^\n]+)")


@dataclass(frozen=True)
class Verdict:
    correct: bool
    extracted: str | None
    error: str | None = None
    format_ok: bool | None = None

    @property
    def reward(self) -> float:
        return 1.0 if self.correct else 0.0


def parse_number(text: str) -> Fraction | None:
    """An exact rational from `12`, `-3.5`, `1,234`, `7/8`; None when it is not a number."""
    s = text.strip().replace(",", "").rstrip(".").replace("$", "")
    if not s:
        return None
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            return Fraction(num) / Fraction(den)
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def extract_answer(completion: str) -> str | None:
    """The answer a completion commits to: boxed, then `####`, then its last number."""
    boxed = _BOXED_RE.findall(completion)
    if boxed:
        return boxed[-1].strip()
    hashed = _HASH_RE.findall(completion)
    if hashed:
        return hashed[-1].strip()
    numbers = _NUMBER_RE.findall(completion)
    return numbers[-1] if numbers else None


def check_format(completion: str, expected: str | None) -> bool | None:
    """Whether the completion has the asked-for shape: boxed, hash (`#### N`) or number."""
    if expected is None:
        return None
    if expected == "boxed":
        return bool(_BOXED_RE.search(completion))
    if expected == "hash":
        return bool(_HASH_RE.search(completion))
    if expected == "number":
        return parse_number(completion.strip().splitlines()[0] if completion.strip() else "") is not None
    raise ValueError(f"unknown answer format {expected!r} (boxed, hash, number)")


def verify_numeric(completion: str, reference: str) -> Verdict:
    """Correct when the extracted answer equals the reference as a rational number."""
    extracted = extract_answer(completion)
    want = parse_number(extract_answer(reference) or reference)
    if want is None:
        return Verdict(False, extracted, error=f"reference {reference!r} is not a number")
    if extracted is None:
        return Verdict(False, None)
    got = parse_number(extracted)
    return Verdict(got is not None and got == want, extracted)


def numeric_match(references: list[str], predictions: list[str]) -> float:
    """lm-eval metric: 1.0 when the prediction's numeric answer equals the reference."""
    return verify_numeric(str(predictions[0]), str(references[0])).reward


def _math_verify_in_worker(completion: str, reference: str) -> tuple[bool, str | None]:
    """Runs on a worker process's main thread, where math-verify's SIGALRM timeouts work."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    gold = parse(reference if ("$" in reference or "\\" in reference) else f"${reference}$")
    pred = parse(completion, extraction_config=[LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()])
    extracted = str(pred[-1]) if pred else None
    return bool(gold and pred and verify(gold, pred)), extracted


def _warm_up() -> None:
    import math_verify  # noqa: F401 - paid once per worker, not per verification


class MathVerifier:
    """math-verify in a spawned worker process with a hard deadline per verification."""

    def __init__(self, timeout: float = 10.0):
        self.timeout = timeout
        self._pool = None

    def _ensure(self):
        if self._pool is None:
            self._pool = multiprocessing.get_context("spawn").Pool(1, initializer=_warm_up)
        return self._pool

    def verify(self, completion: str, reference: str) -> Verdict:
        job = self._ensure().apply_async(_math_verify_in_worker, (completion, reference))
        try:
            correct, extracted = job.get(self.timeout)
        except multiprocessing.TimeoutError:
            self.close()  # the worker may be stuck in sympy: kill it, the next call starts another
            return Verdict(False, None, error=f"math-verify timed out after {self.timeout:g} s")
        except Exception as exc:  # noqa: BLE001 - recorded, scored 0, never fatal
            return Verdict(False, None, error=f"math-verify failed: {type(exc).__name__}: {exc}"[:500])
        return Verdict(correct, extracted)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None


class Verifier:
    """All verifiers for one evaluation run; use as a context manager (it owns a process)."""

    def __init__(self, math_timeout: float = 10.0, sandbox: SandboxLimits = SandboxLimits()):
        self.math = MathVerifier(math_timeout)
        self.sandbox = sandbox

    def verify(self, kind: Kind, completion: str, reference: str, answer_format: str | None = None,
               program_prefix: str = "") -> Verdict:
        """Verdict for one completion; `reference` is the answer, or the tests for code."""
        fmt = check_format(completion, answer_format)
        if kind == "numeric":
            v = verify_numeric(completion, reference)
        elif kind == "math":
            v = self.math.verify(completion, reference)
        elif kind == "code":
            result = run_code(program_prefix + completion, reference, self.sandbox)
            error = None if result.status in ("passed", "failed") else f"{result.status}: {result.detail}"[:500]
            v = Verdict(result.passed, result.status, error)
        else:
            raise ValueError(f"unknown verifier {kind!r} (numeric, math, code)")
        return Verdict(v.correct, v.extracted, v.error, fmt)

    def close(self) -> None:
        self.math.close()

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
