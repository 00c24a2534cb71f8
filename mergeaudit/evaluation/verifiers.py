"""Verifiers: decide whether a completion is correct, the same way wherever they are used.

The numeric verifier extracts the answer from a completion (a `\\boxed{...}` answer first,
then a `#### answer` line, then the last number in the text) and compares it exactly as a
rational number with the reference, so `68`, `68.0` and `1,234` vs `1234` agree.

`numeric_match` has lm-eval's callable-metric signature, so task YAMLs use it directly:
    metric: !function mergeaudit.evaluation.verifiers.numeric_match
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

_NUMBER_RE = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:/\d+)?|[-+]?\.\d+")
_BOXED_RE = re.compile(r"\\boxed\{([^{}]*)\}")
_HASH_RE = re.compile(r"####\s*([^\n]+)")


@dataclass(frozen=True)
class Verdict:
    correct: bool
    extracted: str | None
    error: str | None = None

    @property
    def reward(self) -> float:
        return 1.0 if self.correct else 0.0


def parse_number(text: str) -> Fraction | None:
    """An exact rational from `12`, `-3.5`, `1,234`, `7/8`; None when it is not a number."""
    s = text.strip().replace(",", "").rstrip(".")
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


def verify_numeric(completion: str, reference: str) -> Verdict:
    """Correct when the extracted answer equals the reference as a rational number."""
    extracted = extract_answer(completion)
    if extracted is None:
        return Verdict(False, None)
    got, want = parse_number(extracted), parse_number(reference)
    if want is None:
        return Verdict(False, extracted, error=f"reference {reference!r} is not a number")
    return Verdict(got is not None and got == want, extracted)


def numeric_match(references: list[str], predictions: list[str]) -> float:
    """lm-eval metric: 1.0 when the prediction's numeric answer equals the reference."""
    return verify_numeric(str(predictions[0]), str(references[0])).reward
