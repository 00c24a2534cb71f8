"""The code sandbox: every escape attempt is stopped or denied, scored 0, recorded, and the
run goes on."""

from __future__ import annotations

import socket

import pytest

from mergeaudit.evaluation.sandbox import SandboxLimits, run_code

LIMITS = SandboxLimits(wall_seconds=6, cpu_seconds=2, memory_bytes=512 * 1024**2, file_bytes=256 * 1024)


def test_a_correct_program_passes_and_a_wrong_one_fails():
    ok = run_code("def add(a, b):\n    return a + b\n", "assert add(1, 2) == 3\n", LIMITS)
    assert ok.passed and ok.status == "passed"
    bad = run_code("def add(a, b):\n    return a - b\n", "assert add(1, 2) == 3\n", LIMITS)
    assert not bad.passed and bad.status == "failed"


@pytest.mark.parametrize(
    "program,statuses",
    [
        ("import os\nwhile True:\n    os.fork()\n", {"denied"}),
        ("import subprocess\nsubprocess.run(['sh', '-c', 'echo hi'])\n", {"denied"}),
        ("import os\nos.system('true')\n", {"denied"}),
        ("while True:\n    pass\n", {"timeout"}),
        ("import time\ntime.sleep(60)\n", {"timeout"}),
        ("while True:\n    print('x' * 10000)\n", {"output_limit"}),
        ("x = bytearray(8 * 1024**3)\n", {"memory"}),
        ("import ctypes\n", {"denied"}),
        ("def f(:\n", {"error"}),
    ],
    ids=["fork-bomb", "subprocess", "os-system", "infinite-loop", "sleep", "output-flood", "memory", "ctypes", "syntax"],
)
def test_escapes_are_stopped_and_recorded(program, statuses):
    result = run_code(program, "", LIMITS)
    assert not result.passed
    assert result.status in statuses, result
    assert result.seconds < LIMITS.wall_seconds + 3


def test_writes_outside_the_sandbox_are_denied(tmp_path):
    target = tmp_path / "escaped.txt"
    for program in (f"open({str(target)!r}, 'w').write('x')\n",
                    f"import os\nos.rename('program.py', {str(target)!r})\n",
                    "open('/tmp/mergeaudit-escape-probe', 'w').write('x')\n"):
        result = run_code(program, "", LIMITS)
        assert result.status == "denied", result
    assert not target.exists()
    inside = run_code("open('scratch.txt', 'w').write('ok')\nassert open('scratch.txt').read() == 'ok'\n", "", LIMITS)
    assert inside.passed, inside


def test_network_calls_are_denied():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.5)
        port = server.getsockname()[1]
        result = run_code(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n", "", LIMITS)
        assert result.status == "denied", result
        with pytest.raises(TimeoutError):
            server.accept()
    assert "net=" in result.isolation and "fs=" in result.isolation


def test_the_run_goes_on_after_an_escape():
    results = [run_code(p, t, LIMITS) for p, t in [("while True: pass\n", ""), ("x = 1\n", "assert x == 1\n")]]
    assert [r.status for r in results] == ["timeout", "passed"]
