"""The offline task packs we ship, generated from seeds so they can be checked and extended.

- arithmetic: a+b, a-b, a*b at several sizes (`mergeaudit.evaluation.arithmetic.make_problems`);
- word problems: short grade-school problems from templates written for this project, every
  answer computed, not typed;
- code: small Python functions with a prompt (signature and docstring), a reference solution
  and unit tests, run in the sandbox.

`write_packs(tasks_dir)` regenerates the JSONL files; a test checks the shipped files equal
what the generators produce.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from mergeaudit.evaluation.arithmetic import make_problems

ARITHMETIC = {  # task file -> (op, digits, n, seed)
    "add2": ("add", 2, 100, 2026),
    "add3": ("add", 3, 100, 2026),
    "sub2": ("sub", 2, 100, 2026),
    "mul1": ("mul", 1, 50, 2026),
    "mul2": ("mul", 2, 100, 2026),
}
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Farah", "Gus", "Hana", "Ivo", "Jules"]
ITEMS = ["apples", "stickers", "marbles", "books", "shells", "pencils", "cards", "stamps"]


def _word_problem(rng: random.Random, template: int) -> tuple[str, int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = rng.randint(12, 60), rng.randint(2, 9), rng.randint(2, 11)
    if template == 0:
        return f"{name} has {a} {item}. {name} buys {b} more. How many {item} does {name} have now?", a + b
    if template == 1:
        return f"{name} had {a} {item} and gave {b} of them to a friend. How many {item} are left?", a - b
    if template == 2:
        return f"A box holds {c} {item}. How many {item} are in {b} boxes?", c * b
    if template == 3:
        return f"{name} shares {c * b} {item} equally among {b} friends. How many {item} does each friend get?", c
    if template == 4:
        return f"A train travels {a} kilometres every hour. How many kilometres does it travel in {b} hours?", a * b
    if template == 5:
        return f"{name} reads {c} pages every day. How many pages does {name} read in {b} weeks?", c * 7 * b
    if template == 6:
        return f"A pencil costs {c} cents. How many cents do {b} pencils cost?", c * b
    if template == 7:
        return (
            f"{name} has {a} {item}, loses {b} of them and then finds {c} more. How many {item} does {name} have now?",
            a - b + c,
        )
    if template == 8:
        return f"A farm has {b} cows and {c} chickens. How many legs do these animals have in total?", 4 * b + 2 * c
    return (
        f"{name} saves {c} dollars every week for {b} weeks and then spends {b + c} dollars. "
        f"How many dollars are left?",
        c * b - (b + c),
    )


def word_problems(n: int = 50, seed: int = 2026) -> list[dict]:
    rng = random.Random(f"word:{seed}")
    rows = []
    for i in range(n):
        question, answer = _word_problem(rng, i % 10)
        rows.append({"id": f"word-{i:04d}", "question": question, "answer": str(answer)})
    return rows


CODE = [
    (
        "add",
        'def add(a, b):\n    """Return the sum of a and b."""\n',
        "    return a + b\n",
        ["add(1, 2) == 3", "add(-4, 4) == 0", "add(10, 5) == 15"],
    ),
    (
        "is_even",
        'def is_even(n):\n    """Return True when the integer n is even."""\n',
        "    return n % 2 == 0\n",
        ["is_even(4)", "not is_even(7)", "is_even(0)"],
    ),
    (
        "reverse_string",
        'def reverse_string(s):\n    """Return s reversed."""\n',
        "    return s[::-1]\n",
        ["reverse_string('abc') == 'cba'", "reverse_string('') == ''"],
    ),
    (
        "max_of_list",
        'def max_of_list(xs):\n    """Return the largest number in the non-empty list xs."""\n',
        "    return max(xs)\n",
        ["max_of_list([3, 9, 2]) == 9", "max_of_list([-5, -2]) == -2"],
    ),
    (
        "count_vowels",
        'def count_vowels(s):\n    """Return how many vowels (a, e, i, o, u; any case) s has."""\n',
        "    return sum(c in 'aeiouAEIOU' for c in s)\n",
        ["count_vowels('banana') == 3", "count_vowels('xyz') == 0", "count_vowels('AEIOU') == 5"],
    ),
    (
        "factorial",
        'def factorial(n):\n    """Return n! for an integer n >= 0."""\n',
        "    out = 1\n    for i in range(2, n + 1):\n        out *= i\n    return out\n",
        ["factorial(0) == 1", "factorial(5) == 120"],
    ),
    (
        "fibonacci",
        'def fibonacci(n):\n    """Return the n-th Fibonacci number, with fibonacci(0) = 0 and fibonacci(1) = 1."""\n',
        "    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
        ["fibonacci(0) == 0", "fibonacci(1) == 1", "fibonacci(10) == 55"],
    ),
    (
        "is_palindrome",
        'def is_palindrome(s):\n    """Return True when s reads the same forwards and backwards."""\n',
        "    return s == s[::-1]\n",
        ["is_palindrome('level')", "not is_palindrome('ab')", "is_palindrome('')"],
    ),
    (
        "sum_of_squares",
        'def sum_of_squares(n):\n    """Return 1**2 + 2**2 + ... + n**2."""\n',
        "    return sum(i * i for i in range(1, n + 1))\n",
        ["sum_of_squares(3) == 14", "sum_of_squares(0) == 0"],
    ),
    (
        "fizzbuzz",
        "def fizzbuzz(n):\n"
        "    \"\"\"Return 'FizzBuzz' if n is divisible by 15, 'Fizz' by 3, 'Buzz' by 5, else str(n).\"\"\"\n",
        "    if n % 15 == 0:\n        return 'FizzBuzz'\n    if n % 3 == 0:\n        return 'Fizz'\n"
        "    if n % 5 == 0:\n        return 'Buzz'\n    return str(n)\n",
        ["fizzbuzz(15) == 'FizzBuzz'", "fizzbuzz(9) == 'Fizz'", "fizzbuzz(10) == 'Buzz'", "fizzbuzz(7) == '7'"],
    ),
    (
        "unique_sorted",
        'def unique_sorted(xs):\n    """Return the distinct elements of xs in increasing order."""\n',
        "    return sorted(set(xs))\n",
        ["unique_sorted([3, 1, 3, 2]) == [1, 2, 3]", "unique_sorted([]) == []"],
    ),
    (
        "gcd",
        'def gcd(a, b):\n    """Return the greatest common divisor of the positive integers a and b."""\n',
        "    while b:\n        a, b = b, a % b\n    return a\n",
        ["gcd(12, 18) == 6", "gcd(7, 3) == 1"],
    ),
]


def code_problems() -> list[dict]:
    rows = []
    for name, prompt, solution, asserts in CODE:
        test = "def check(candidate):\n" + "".join(
            f"    assert {a.replace(name + '(', 'candidate(')}\n" for a in asserts
        )
        rows.append(
            {
                "task_id": f"code-{name}",
                "prompt": prompt,
                "entry_point": name,
                "canonical_solution": solution,
                "test": test,
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def expected_packs() -> dict[str, list[dict]]:
    """Relative JSONL path -> rows, for every generated pack."""
    packs = {f"arithmetic/{k}.jsonl": make_problems(*v) for k, v in ARITHMETIC.items()}
    packs["word_problems/word_problems.jsonl"] = word_problems()
    packs["code/code_mini.jsonl"] = code_problems()
    return packs


def write_packs(tasks_dir: Path) -> None:
    for rel, rows in expected_packs().items():
        write_jsonl(tasks_dir / rel, rows)
