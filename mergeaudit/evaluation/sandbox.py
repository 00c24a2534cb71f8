"""Run model-generated code against unit tests in a sandbox, and decide the verdict outside it.

`run_code(program, tests, limits)`:

1. `code_tests.compile_tests` splits the tests here into probes (the calls that need the
   program, e.g. `add(1, 2)`) and the comparisons (`== 3`), which never leave this process;
   shapes it cannot split score "unsupported" without running anything.
2. The program runs in the sandbox of `isolation` (bubblewrap: uid 65534 outside and inside, no
   capabilities, own pid/net/user namespaces, read-only root, empty environment, resource limits
   that bind; or, only if `minimum_isolation="best_effort"` allows it, the weaker fallback).
   Inside, `sandbox_harness.py` measures the isolation before the program runs, then evaluates
   the probes and writes their values (strict primitive encoding) to a file.
3. A wall-clock deadline here kills the whole sandbox (bwrap's process group, then its pid 1,
   which ends the pid namespace); this process then waits until no process of that namespace is
   left and reads the files only after that, so nothing it reads can block on a process.
4. The results are validated (the harness's nonce, one record per probe, in order, then "done";
   values of plain types only) and the comparisons are evaluated here over the decoded values.
   A malformed or forged record, a value of any other type (an object whose `__eq__` lies), an
   exit (`SystemExit`, `os._exit`) before the tests finished: status "violation", score 0.

Statuses: passed, failed, error, denied, timeout, memory, output_limit, crashed, violation,
unsupported. `detail` never carries a value of this process's secret-looking environment
variables (names matching KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL, values of 8+ characters).
When the configured minimum isolation is not available, `IsolationError` is raised (before the
program runs); `require_isolation` checks it once, before a run's expensive work.

    result = run_code("def add(a, b):\\n    return a + b\\n", "assert add(1, 2) == 3\\n")
"""

from __future__ import annotations

import ast
import errno
import functools
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergeaudit.evaluation import code_tests, isolation
from mergeaudit.evaluation.isolation import NOBODY, IsolationError

HARNESS = Path(__file__).with_name("sandbox_harness.py")
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.IGNORECASE)
_broken_bwrap: list[str] = []  # why bwrap failed to start, once per process (best_effort falls back)


@dataclass(frozen=True)
class SandboxLimits:
    wall_seconds: float = 10.0
    cpu_seconds: int = 5
    memory_bytes: int = 1024 * 1024 * 1024
    file_bytes: int = 1024 * 1024  # also the cap on captured stdout/stderr and the results file
    open_files: int = 64
    processes: int = 16  # processes the program may have at once, itself included (bwrap)
    work_bytes: int = 16 * 1024 * 1024  # size of the writable /work tmpfs (bwrap)
    minimum_isolation: str = "bwrap"  # or "best_effort": fall back when bwrap is unavailable


@dataclass(frozen=True)
class CodeResult:
    passed: bool
    status: str
    detail: str
    seconds: float
    isolation: str  # measured layers, e.g. "bwrap kuid=65534 user=nobody caps=none nnp pid=ns ..."


def scrub(text: str) -> str:
    """`text` without the values of this process's secret-looking environment variables."""
    for name, value in os.environ.items():
        if len(value) >= 8 and SECRET_NAME.search(name):
            text = text.replace(value, "[redacted]")
    return text


def sandbox_kind(minimum: str) -> str:
    if minimum not in isolation.MINIMUM_LEVELS:
        raise IsolationError(f"unknown minimum isolation {minimum!r} ({', '.join(isolation.MINIMUM_LEVELS)})")
    if isolation.bwrap_path() and not _broken_bwrap:
        return "bwrap"
    if minimum == "bwrap":
        why = _broken_bwrap[0] if _broken_bwrap else "bubblewrap (bwrap) is not installed"
        raise IsolationError(
            f"refusing to run model-generated code: {why}; install the Debian package "
            "bubblewrap (`make test` does) or set evaluation.code_isolation: best_effort"
        )
    return "launcher"


def require_isolation(minimum: str = "bwrap") -> str:
    """Start one trivial sandbox and return its measured isolation; IsolationError when the
    minimum is not met. Cached per process and bwrap binary: call it before expensive work."""
    return _require_isolation(minimum, isolation.bwrap_path())


@functools.cache
def _require_isolation(minimum: str, bwrap: str | None) -> str:
    result = run_code("x = 1\n", "assert x == 1\n", SandboxLimits(wall_seconds=30, minimum_isolation=minimum))
    if not result.passed:
        raise IsolationError(f"the sandbox does not run a trivial program: {result.status}: {result.detail}")
    return result.isolation


def run_code(
    program: str, tests: str, limits: SandboxLimits = SandboxLimits(), *, audit_hook: bool = True
) -> CodeResult:
    """Run `program`, evaluate `tests` against it, contained; never raises for anything the
    program does. `audit_hook=False` leaves out the in-process layer (to test the others)."""
    start = time.monotonic()
    try:
        plan = code_tests.compile_tests(tests)
    except code_tests.UnsupportedTests as exc:
        return CodeResult(False, "unsupported", scrub(str(exc))[:500], time.monotonic() - start, "not run")
    kind = sandbox_kind(limits.minimum_isolation)
    result = _run(kind, program, plan, limits, audit_hook, start)
    if result is None:  # bwrap did not start: only best_effort gets here
        result = _run(sandbox_kind(limits.minimum_isolation), program, plan, limits, audit_hook, start)
    if result is None:
        raise IsolationError("the fallback sandbox launcher did not start")
    return CodeResult(result.passed, result.status, scrub(result.detail)[:1000], result.seconds, result.isolation)


def _run(
    kind: str, program: str, plan: code_tests.TestPlan, limits: SandboxLimits, hook: bool, start: float
) -> CodeResult | None:
    job = Path(tempfile.mkdtemp(prefix="mergeaudit-sandbox-", dir=isolation.job_parent()))
    opened: list[int] = []
    try:
        os.chmod(job, 0o711)
        (job / "in").mkdir(mode=0o755)
        nonce = secrets.token_hex(16)
        as_root = os.geteuid() == 0

        def open_out(name: str) -> int:
            fd = os.open(job / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            opened.append(fd)
            return fd

        fds = {
            "results": open_out("results.jsonl"),
            "isolation": open_out("isolation.jsonl"),
            "info": open_out("info.json"),
        }
        nproc = limits.processes + (1 if kind == "bwrap" else 0)  # bwrap's pid 1 counts too
        spec = {
            "probes": plan.probes,
            "nonce": nonce,
            "hook": hook,
            "require": kind == "bwrap" and limits.minimum_isolation == "bwrap",
            "results_fd": fds["results"],
            "isolation_fd": fds["isolation"],
            "limits": {
                "RLIMIT_CPU": limits.cpu_seconds,
                "RLIMIT_AS": limits.memory_bytes,
                "RLIMIT_FSIZE": limits.file_bytes,
                "RLIMIT_NOFILE": limits.open_files,
                "RLIMIT_NPROC": nproc,
                "RLIMIT_CORE": 0,
            },
        }
        for name, text in (
            ("program.py", program),
            ("plan.json", json.dumps(spec)),
            ("sandbox_harness.py", HARNESS.read_text()),
        ):
            (job / "in" / name).write_text(text)
            os.chmod(job / "in" / name, 0o644)
        if kind == "launcher":
            (job / "work").mkdir()
            if as_root:
                os.chown(job / "work", NOBODY, NOBODY)
        argv = isolation.command(kind, job, fds, limits.work_bytes)
        env = {} if kind == "bwrap" else {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        with open(job / "stdout.txt", "wb") as out, open(job / "stderr.txt", "wb") as err:
            proc = subprocess.Popen(
                argv,
                cwd=job,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                pass_fds=tuple(fds.values()),
                start_new_session=True,
            )
        for fd in opened:
            os.close(fd)
        opened.clear()
        try:
            proc.wait(timeout=limits.wall_seconds)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        _end(proc, job)
        return _classify(kind, proc.returncode, timed_out, job, plan, nonce, limits, hook, time.monotonic() - start)
    finally:
        for fd in opened:
            os.close(fd)
        shutil.rmtree(job, ignore_errors=True)


def _end(proc: subprocess.Popen, job: Path) -> None:
    """Kill what is left of the sandbox and wait until its pid namespace is empty."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    info = _read_json(job / "info.json")
    ns = info.get("pid-namespace") if isinstance(info, dict) else None
    child = info.get("child-pid") if isinstance(info, dict) else None
    if isinstance(child, int) and isinstance(ns, int):
        try:  # bwrap's pid 1: its end makes the kernel kill every process of the namespace
            pidfd = os.pidfd_open(child)
        except OSError:
            pidfd = -1
        if pidfd >= 0:
            try:
                if os.stat(f"/proc/{child}/ns/pid").st_ino == ns:  # not a recycled pid
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except OSError:
                pass
            finally:
                os.close(pidfd)
    proc.wait()
    if isinstance(ns, int):
        deadline = time.monotonic() + 10
        while isolation_processes(ns) and time.monotonic() < deadline:
            time.sleep(0.01)


def isolation_processes(pid_namespace: int) -> list[int]:
    """Pids (here) of the live processes in the pid namespace with that inode. Zombies are dead:
    bwrap's pid 1 can stay one until this machine's init reaps it (1.3 s measured here)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}/ns/pid").st_ino != pid_namespace:
                    continue
                with open(f"/proc/{entry}/stat", "rb") as fh:
                    state = fh.read().rpartition(b")")[2].split()[0]
            except (OSError, IndexError):
                continue
            if state not in (b"Z", b"X"):
                found.append(int(entry))
    return found


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes()[:65536] or b"null")
    except (OSError, ValueError):
        return None


def _read_lines(path: Path, cap: int) -> tuple[list[Any], bool]:
    """JSON lines of a file (None for a line that does not parse), and whether it hit `cap`."""
    try:
        data = path.read_bytes()[: cap + 1]
    except OSError:
        return [], False
    out = []
    for line in data.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            out.append(None)
    return out, len(data) >= cap


def _tail(job: Path, name: str) -> str:
    try:
        lines = (job / name).read_bytes()[-2000:].decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


def _classify(
    kind: str,
    code: int,
    timed_out: bool,
    job: Path,
    plan: code_tests.TestPlan,
    nonce: str,
    limits: SandboxLimits,
    hook: bool,
    seconds: float,
) -> CodeResult | None:
    records, _ = _read_lines(job / "isolation.jsonl", 65536)
    text, missing = isolation.describe(kind, [r for r in records if isinstance(r, dict)], hook)
    measured = any(isinstance(r, dict) and "harness" in r for r in records)
    if not measured and not timed_out:
        why = f"the sandbox did not start ({kind}, exit status {code}): {_tail(job, 'stderr.txt')}"
        if kind == "bwrap" and limits.minimum_isolation != "bwrap":
            _broken_bwrap.append(why)
            return None
        raise IsolationError(why)
    if measured and missing and limits.minimum_isolation == "bwrap":
        raise IsolationError(f"refusing to score code: the sandbox lacks {', '.join(missing)} (measured: {text})")

    def result(status: str, detail: str) -> CodeResult:
        return CodeResult(status == "passed", status, detail, seconds, text)

    if timed_out:
        return result("timeout", f"wall-clock deadline of {limits.wall_seconds:g} s exceeded")
    sig = code - 128 if kind == "bwrap" and code > 128 else -code if code < 0 else None
    if sig in (signal.SIGXCPU, signal.SIGKILL):
        return result("timeout", f"killed by {signal.Signals(sig).name} (CPU limit, or out of memory)")
    if sig == signal.SIGXFSZ:
        return result("output_limit", "killed by SIGXFSZ")
    if sig is not None and sig in signal.Signals._value2member_map_:
        return result("crashed", f"killed by {signal.Signals(sig).name}")
    lines, full = _read_lines(job / "results.jsonl", limits.file_bytes)
    return result(*_verdict(lines, full, plan, nonce, code))


def _exception_status(error: dict) -> str:
    if error.get("exit"):
        return "violation"
    if error.get("type") == "PermissionError" or error.get("errno") in (errno.EPERM, errno.EACCES, errno.EROFS):
        return "denied"
    if error.get("type") == "MemoryError":
        return "memory"
    if error.get("errno") == errno.EFBIG:
        return "output_limit"
    return "error"


def _verdict(lines: list[Any], full: bool, plan: code_tests.TestPlan, nonce: str, code: int) -> tuple[str, str]:
    """(status, detail) from the harness's records; the comparisons are evaluated here."""
    outcomes: list[tuple[str, Any]] = []  # per probe: ("value", v) | ("raised", error) | ("refused", (why, msg))
    done = False
    for line in lines:
        if not isinstance(line, dict) or line.get("n") != nonce or done:
            what = "after the end of the tests" if done else "not written by the harness"
            return "violation", f"the results hold a record {what}: {str(line)[:200]}"
        kind = line.get("kind")
        if kind == "program_error" and not outcomes:
            error = line.get("error") if isinstance(line.get("error"), dict) else {}
            status = _exception_status(error)
            reason = "the program exited before the tests ran: " if status == "violation" else ""
            return status, f"{reason}{error.get('type')}: {error.get('message')}"
        if kind == "done" and len(outcomes) == len(plan.probes):
            done = True
            continue
        if kind not in ("value", "raised", "refused") or line.get("case") != len(outcomes):
            return "violation", f"the results hold a record out of order or of unknown kind: {str(line)[:200]}"
        if kind == "value":
            try:
                outcomes.append(("value", _decode(line.get("v"))))
            except (TypeError, ValueError, RecursionError) as exc:
                return "violation", f"test {len(outcomes)}: a value not in the harness's encoding ({exc})"
        elif kind == "raised":
            outcomes.append(("raised", line.get("error") if isinstance(line.get("error"), dict) else {}))
        else:
            outcomes.append(("refused", (line.get("why"), str(line.get("message")))))
    if not done:
        if full:
            return "output_limit", "the results file reached the file-size limit"
        return "violation", (
            f"the sandbox ended before the tests finished ({len(outcomes)} of {len(plan.probes)} "
            f"probes reported, exit status {code})"
        )
    for i, (kind, value) in enumerate(outcomes):
        if kind == "refused" and value[0] == "type":
            return "violation", f"{plan.probes[i]}: {value[1]}"
        if kind == "raised" and _exception_status(value) == "violation":
            return "violation", f"{plan.probes[i]} raised {value.get('type')} during the tests"
    values = [v if kind == "value" else None for kind, v in outcomes]
    env = dict(plan.env)
    for number, (step, name, expr) in enumerate(plan.steps, 1):
        bad = sorted({n.index for n in _probes_in(expr) if outcomes[n.index][0] != "value"})
        if bad:
            kind, value = outcomes[bad[0]]
            if kind == "refused":
                return "failed", f"assert #{number} {name}: {plan.probes[bad[0]]}: {value[1]}"
            status = _exception_status(value)
            detail = f"{plan.probes[bad[0]]} raised {value.get('type')}: {value.get('message')}"
            return ("failed" if status == "error" else status), f"assert #{number} {name}: {detail}"
        try:
            got = code_tests.evaluate(expr, values, env)
        except Exception as exc:  # noqa: BLE001 - a comparison that cannot be made fails the test
            return "failed", f"assert #{number} {name}: {type(exc).__name__}: {exc}"
        if step == "bind":
            env[name] = got
        elif not got:
            shown = ", ".join(f"{plan.probes[n.index]} returned {values[n.index]!r:.200}" for n in _probes_in(expr))
            return "failed", f"assert #{number} failed: {name}" + (f" ({shown})" if shown else "")
    return "passed", ""


def _probes_in(expr: Any) -> list[code_tests.Probe]:
    return [n for n in ast.walk(expr) if isinstance(n, code_tests.Probe)]


def _decode(v: Any, depth: int = 0) -> Any:
    """A value of the harness's encoding: JSON scalars and lists, and one-key objects tagging
    tuple, set, frozenset and dict (as [key, value] pairs)."""
    if depth > 40:
        raise ValueError("nested too deeply")
    if v is None or type(v) in (bool, int, float, str):
        return v
    if type(v) is list:
        return [_decode(x, depth + 1) for x in v]
    if type(v) is dict and len(v) == 1:
        ((tag, items),) = v.items()
        if type(items) is list:
            decoded = [_decode(x, depth + 1) for x in items]
            if tag == "tuple":
                return tuple(decoded)
            if tag == "set":
                return set(decoded)
            if tag == "frozenset":
                return frozenset(decoded)
            if tag == "dict" and all(type(p) is list and len(p) == 2 for p in decoded):
                return {k: val for k, val in decoded}
    raise ValueError(f"unexpected {type(v).__name__}")
