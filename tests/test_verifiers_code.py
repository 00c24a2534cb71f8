"""Code verdicts are decided outside the program: every forgery of issue 13 scores 0 and is
recorded, and details never carry the evaluator's secrets.

The program runs in the bubblewrap sandbox with the audit hook on (the default); only values
come back, and the comparison (`== 3`) is made here. Each hostile program is capped by
SandboxLimits; none spawns.
"""

from __future__ import annotations

import pytest

from mergeaudit.evaluation.code_tests import UnsupportedTests, compile_tests
from mergeaudit.evaluation.packs import code_problems
from mergeaudit.evaluation.sandbox import SandboxLimits, run_code
from mergeaudit.evaluation.verifiers import Verifier

LIMITS = SandboxLimits(wall_seconds=6, cpu_seconds=2, memory_bytes=512 * 1024**2, file_bytes=256 * 1024, processes=8)
TESTS = "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-4, 4) == 0\n\ncheck(add)\n"


pytestmark = pytest.mark.usefixtures("bwrap")


FORGERIES = {
    # issue 13's three, adapted to the new harness where they need a target
    "write-verdict-to-every-fd": (
        "import os\n"
        "for fd in range(3, 64):\n"
        '    try:\n        os.write(fd, b\'{"status": "passed", "detail": ""}\\n\')\n'
        "    except OSError:\n        pass\n",
        "violation",
    ),
    "call-the-harness-sender": (
        "import sys\n"
        "frame = sys._getframe()\n"
        "while frame is not None and 'send' not in frame.f_locals:\n    frame = frame.f_back\n"
        "frame.f_locals['send']('\"status\":\"passed\"')\n"
        "frame.f_locals['send']('\"kind\":\"done\"')\n",
        "violation",
    ),
    "eq-always-true": (
        "class Yes:\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return Yes()\n",
        "violation",
    ),
    "int-subclass": (
        "class Three(int):\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return Three(3)\n",
        "violation",
    ),
    "patched-builtins": (
        "import builtins, json\nbuiltins.isinstance = lambda *a: True\n"
        "builtins.type = lambda *a: int\n"
        "json.dumps = lambda *a, **k: '3'\n"
        "class Yes:\n    def __eq__(self, other):\n        return True\n"
        "def add(a, b):\n    return Yes()\n",
        "violation",
    ),
    "exit-early": ("import sys\nsys.exit(0)\n", "violation"),
    "os-exit-early": ("import os\nos._exit(0)\n", "violation"),
    "system-exit-in-tests": ("def add(a, b):\n    raise SystemExit(0)\n", "violation"),
    # no effect at all: the harness holds its own references, stdout is not a channel
    "old-fd-in-argv": ('import os, sys\nos.write(int(sys.argv[1]), b\'{"status": "passed"}\')\n', "error"),
    "patched-os-write": ("import os\nos.write = lambda fd, data: len(data)\n", "failed"),
    "fake-stdout-line": ('print(\'{"status": "passed", "detail": ""}\')\nprint(\'passed\')\n', "failed"),
}


@pytest.mark.parametrize("name", list(FORGERIES))
def test_forged_verdicts_score_zero(name):
    program, status = FORGERIES[name]
    result = run_code(program, TESTS, LIMITS)
    assert not result.passed, result
    assert result.status == status, result
    with Verifier(sandbox=LIMITS) as verifier:
        verdict = verifier.verify("code", program, TESTS)
    assert (
        verdict.reward == 0.0
        and verdict.status == {"violation": "violation", "error": "error", "failed": "wrong"}[status]
    )
    if status == "violation":
        assert verdict.error.startswith("violation: ")


def test_the_expected_values_never_enter_the_sandbox():
    program = (
        "import os\n"
        "def probe():\n"
        "    needle = str(918273644 + int('1'))  # not a (folded) constant\n"
        "    for root, _, files in os.walk('/task'):\n"
        "        for name in files:\n"
        "            if needle in open(os.path.join(root, name)).read():\n"
        "                return 'found'\n"
        "    import gc\n"
        "    if any(needle in repr(o) for o in gc.get_objects() if isinstance(o, (dict, list, tuple))):\n"
        "        return 'found'\n"
        "    return 'absent'\n"
    )
    result = run_code(program, "assert probe() == 918273645\n", LIMITS, audit_hook=False)
    assert result.status == "failed" and "probe() returned 'absent'" in result.detail, result


def test_values_are_compared_here_with_python_semantics():
    program = (
        "def f(x):\n    return x / 3\n"
        "def g(n):\n    return n % 2 == 0\n"
        "def h(s):\n    return (s, {s: [1, 2.5, None]}, {1, 2})\n"
    )
    tests = (
        "def check(candidate):\n"
        "    assert abs(candidate(1.0) - 0.3333333) < 1e-6\n"
        "    assert math.isclose(candidate(3), 1)\n"
        "    assert candidate(3) == 1\n"
        "    value = candidate(6)\n"
        "    assert value == 2.0 and 1 < value <= 2, 'message'\n\n"
        "check(f)\n"
        "assert g(4)\nassert not g(7)\nassert g(7) is False\n"
        "assert h('a') == ('a', {'a': [1, 2.5, None]}, {2, 1})\n"
        "assert sorted(h('b')[2]) == [1, 2]\n"
    )
    assert run_code(program, tests, LIMITS).passed
    wrong = run_code(program.replace("x / 3", "x / 3 + 1e-3"), tests, LIMITS)
    assert wrong.status == "failed" and wrong.detail.startswith("assert #1 failed")
    raised = run_code("def add(a, b):\n    return a + c\n", TESTS, LIMITS)
    assert raised.status == "failed" and "NameError" in raised.detail


@pytest.mark.parametrize(
    "tests",
    [
        "def check(candidate):\n    for i in range(3):\n        assert candidate(i) == i\n\ncheck(f)\n",
        "import math\nassert f(1) == 1\n",
        "def helper(x, y):\n    return x == y\n\n"
        "def check(candidate):\n    assert helper(candidate(1), 1)\n\ncheck(f)\n",
        "def check(candidate):\n    x = candidate(1)\n    assert candidate(x) == 1\n\ncheck(f)\n",
        "assert f(1) is 1\n",
        "assert [f(i) for i in range(3)] == [0, 1, 2]\n",
    ],
    ids=["loop", "import", "helper", "dependent-call", "is-int", "comprehension"],
)
def test_unsupported_test_shapes_are_refused_before_running(tests):
    """A helper or a comprehension would compare inside the sandbox, where a lying value
    decides: such tests are scored "unsupported", and nothing runs."""
    with pytest.raises(UnsupportedTests):
        compile_tests(tests)
    result = run_code("def f(x):\n    return x\n", tests, LIMITS)
    assert result.status == "unsupported" and result.isolation == "not run" and not result.passed, result


def test_every_shipped_code_task_has_supported_tests():
    for row in code_problems():
        tests = f"{row['test']}\ncheck({row['entry_point']})\n"  # the pack's doc_to_target
        assert compile_tests(tests).probes
        assert run_code(row["prompt"] + row["canonical_solution"], tests, LIMITS).passed, row["task_id"]


def test_details_never_carry_the_evaluators_secrets(monkeypatch):
    secret = "AKIA-this-is-a-leaked-secret-value"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    program = f"def add(a, b):\n    raise RuntimeError('found it: {secret}')\n"  # as if it had leaked in
    result = run_code(program, TESTS, LIMITS)
    assert secret not in result.detail and "[redacted]" in result.detail
    with Verifier(sandbox=LIMITS) as verifier:
        verdict = verifier.verify("code", f"raise ValueError('{secret}')\n", TESTS)
    assert verdict.status == "error" and secret not in verdict.error and "[redacted]" in verdict.error
