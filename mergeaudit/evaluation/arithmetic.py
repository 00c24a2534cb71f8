"""Verifiable arithmetic problems, generated deterministically from a seed.

They make the shipped offline arithmetic packs (`packs`), which the toy models train and are
tested on, and the demo's calibration data. Prompts are short and character-level friendly:
`"23+45="` with answer `"68"`.

    make_problems("add", digits=2, n=100, seed=1)
"""

from __future__ import annotations

import random

OPS = {"add": "+", "sub": "-", "mul": "*"}


def make_problems(op: str, digits: int, n: int, seed: int) -> list[dict[str, str]]:
    """n distinct problems `a<op>b=` with operands of exactly `digits` digits."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; known: {', '.join(OPS)}")
    rng = random.Random(f"{op}:{digits}:{seed}")
    lo, hi = 10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1
    seen: set[tuple[int, int]] = set()
    out = []
    while len(out) < n:
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if op == "sub" and b > a:
            a, b = b, a
        if (a, b) in seen:
            continue
        seen.add((a, b))
        value = a + b if op == "add" else a - b if op == "sub" else a * b
        out.append({"id": f"{op}{digits}-{len(out):04d}", "question": f"{a}{OPS[op]}{b}=", "answer": str(value)})
    return out
