"""Verifiers: decide whether a completion is correct, the same way wherever they are used.

- numeric: the answer a completion commits to (a `\\boxed{...}` answer first, then a `####`
  line, then its last number) equals the reference as an exact rational (`68` = `68.0`,
  `1,234` = `1234`, `3/4` = `0.75`). Numbers with more than MAX_DIGITS digits or an exponent
  beyond +-MAX_EXPONENT are refused before any arithmetic (`\\boxed{1e999999999}` used to build a
  10**999999999 Fraction for minutes), so a check is linear in the completion's length: no
  deadline is needed (the tests time a 1 MB hostile completion);
- math: math-verify (boxed answer first) compares symbolically. math-verify times itself out
  with SIGALRM, which only works on a process's main thread (Prefect runs tasks in worker
  threads), so `MathVerifier` runs it in a spawned worker process, on that process's main
  thread, under our own hard deadline. math-verify's own parse/compare timeouts (which it
  otherwise turns into an empty parse or False, i.e. a silent wrong answer) are caught with
  `raise_on_error=True` per comparison; either kind of timeout gives `status="timeout"` and an
  error starting with "timeout:"; it never crashes the run and is never a plain wrong answer;
- code: the program runs against its unit tests in `mergeaudit.evaluation.sandbox`, which
  decides the verdict outside the program's process; forgeries give `status="violation"`;
- format: whether the completion has the shape the task asks for (a boxed answer, a `####`
  line, a bare number).

`Verdict.status` is one of correct, wrong, no_answer, truncated (set by the runner: the
generation ran out of tokens), timeout, violation, error; errors are
scrubbed of secret-looking environment values. `Verifier` bundles the verifiers for a run
(`with Verifier() as v: v.verify("math", completion, ref)`).
`numeric_match` keeps lm-eval's callable-metric signature for task YAMLs.
"""

from __future__ import annotations

import itertools
import multiprocessing
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

from mergeaudit.evaluation.sandbox import SandboxLimits, run_code, scrub

Kind = Literal["numeric", "math", "code"]
MAX_DIGITS = 1000
MAX_EXPONENT = 1000
_DECIMAL_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
STATUSES = ("correct", "wrong", "no_answer", "truncated", "timeout", "violation", "error")
_NUMBER_RE = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:/\d+)?|[-+]?\.\d+")
_BOXED_RE = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
_HASH_RE = re.compile(r"####\s*([^\n]+)")


@dataclass(frozen=True)
class Verdict:
    correct: bool
    extracted: str | None
    error: str | None = None
    format_ok: bool | None = None
    status: str = ""  # derived when empty: correct, wrong, no_answer, timeout or error

    def __post_init__(self) -> None:
        if not self.status:
            status = (
                "correct"
                if self.correct
                else "timeout"
                if (self.error or "").startswith("timeout")
                else "error"
                if self.error
                else "no_answer"
                if self.extracted is None
                else "wrong"
            )
            object.__setattr__(self, "status", status)
        elif self.status not in STATUSES:
            raise ValueError(f"unknown verdict status {self.status!r} ({', '.join(STATUSES)})")

    @property
    def reward(self) -> float:
        return 1.0 if self.correct else 0.0


def _decimal(s: str) -> Fraction | None:
    """A decimal literal as a Fraction, refused (None) beyond MAX_DIGITS digits or an exponent
    beyond +-MAX_EXPONENT: the bounds are checked on the text, before any arithmetic."""
    s = s.strip()
    if not _DECIMAL_RE.fullmatch(s):
        return None
    mantissa, _, exponent = s.lower().partition("e")
    if sum(c.isdigit() for c in mantissa) > MAX_DIGITS or len(exponent.lstrip("+-").lstrip("0")) > 5:
        return None
    if abs(int(exponent or 0)) > MAX_EXPONENT:
        return None
    return Fraction(s)


def parse_number(text: str) -> Fraction | None:
    """An exact rational from `12`, `-3.5`, `1,234`, `7/8`, `2.5e3`; None when it is not a number
    or is too large to compare exactly (see MAX_DIGITS, MAX_EXPONENT)."""
    s = text.strip().replace(",", "").rstrip(".").replace("$", "")
    if not s or len(s) > 2 * MAX_DIGITS + 32:
        return None
    if "/" in s:
        num, den = (_decimal(part) for part in s.split("/", 1))
        return None if num is None or den is None or den == 0 else num / den
    return _decimal(s)


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


def _math_verify_in_worker(completion: str, reference: str, seconds: int) -> tuple[bool, str | None, str | None]:
    """Runs on a worker process's main thread, where math-verify's SIGALRM timeouts work.
    Same semantics as `verify(parse(gold), parse(pred))` (an unparsable text is no answer, a
    comparison that raises is False), except that a parse or comparison that timed out is
    reported (third element) instead of being a silent miss."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    from math_verify.errors import TimeoutException

    timeouts = []

    def parsed(text: str, **kwargs) -> list:
        try:
            return parse(text, parsing_timeout=seconds, raise_on_error=True, **kwargs)
        except TimeoutException:
            timeouts.append("parsing")
        except Exception:  # noqa: BLE001 - math-verify's default: no answer
            pass
        return []

    gold = parsed(reference if ("$" in reference or "\\" in reference) else f"${reference}$")
    pred = parsed(completion, extraction_config=[LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()])
    extracted = str(pred[-1]) if pred else None
    for g, t in itertools.product(gold, pred):
        try:
            if verify(g, t, timeout_seconds=seconds, raise_on_error=True):
                return True, extracted, None
        except TimeoutException:
            timeouts.append("comparison")
        except Exception:  # noqa: BLE001 - math-verify's default: not equal
            pass
    return (
        False,
        extracted,
        (f"timeout: math-verify's {timeouts[0]} took longer than {seconds} s" if timeouts else None),
    )


def _warm_up() -> None:
    import math_verify  # noqa: F401 - paid once per worker, not per verification


class MathVerifier:
    """math-verify in a spawned worker process with a hard deadline per verification
    (`timeout`, measured here) and math-verify's own per-step timeouts (`step_timeout`, whole
    seconds, its SIGALRM)."""

    def __init__(self, timeout: float = 10.0, step_timeout: int = 5):
        self.timeout = timeout
        self.step_timeout = max(1, int(step_timeout))
        self._pool = None

    def _ensure(self):
        if self._pool is None:
            self._pool = multiprocessing.get_context("spawn").Pool(1, initializer=_warm_up)
        return self._pool

    def verify(self, completion: str, reference: str) -> Verdict:
        job = self._ensure().apply_async(_math_verify_in_worker, (completion, reference, self.step_timeout))
        try:
            correct, extracted, timeout = job.get(self.timeout)
        except multiprocessing.TimeoutError:
            self.close()  # the worker may be stuck in sympy: kill it, the next call starts another
            return Verdict(
                False, None, error=f"timeout: math-verify timed out after {self.timeout:g} s", status="timeout"
            )
        except Exception as exc:  # noqa: BLE001 - recorded, scored 0, never fatal
            return Verdict(False, None, error=f"math-verify failed: {type(exc).__name__}: {exc}"[:500], status="error")
        if timeout:
            return Verdict(False, extracted, error=timeout, status="timeout")
        return Verdict(correct, extracted)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None


class Verifier:
    """All verifiers for one evaluation run; use as a context manager (it owns a process)."""

    def __init__(self, math_timeout: float = 10.0, sandbox: SandboxLimits = SandboxLimits()):
        self.math = MathVerifier(math_timeout, step_timeout=min(5, max(1, int(math_timeout / 2))))
        self.sandbox = sandbox

    def verify(
        self, kind: Kind, completion: str, reference: str, answer_format: str | None = None, program_prefix: str = ""
    ) -> Verdict:
        """Verdict for one completion; `reference` is the answer, or the tests for code."""
        fmt = check_format(completion, answer_format)
        if kind == "numeric":
            v = verify_numeric(completion, reference)
        elif kind == "math":
            v = self.math.verify(completion, reference)
        elif kind == "code":
            result = run_code(program_prefix + completion, reference, self.sandbox)
            error = None if result.status in ("passed", "failed") else f"{result.status}: {result.detail}"[:500]
            status = {"passed": "correct", "failed": "wrong", "timeout": "timeout", "violation": "violation"}.get(
                result.status, "error"
            )
            v = Verdict(result.passed, result.status, error, status=status)
        else:
            raise ValueError(f"unknown verifier {kind!r} (numeric, math, code)")
        return Verdict(v.correct, v.extracted, scrub(v.error) if v.error else None, fmt, v.status)

    def close(self) -> None:
        self.math.close()

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
