"""Run model-generated code against unit tests, contained.

Each program runs in a fresh process started through a launcher that, before executing the
test harness, applies (in this order):

- a new session (the whole process group is killed on timeout);
- resource limits: CPU seconds, address space, file size (which also caps the captured
  stdout/stderr, written to files), open files, no core dumps, and a process count;
- new network and mount namespaces where the machine allows it (root, or unprivileged user
  namespaces): no network interfaces but a down loopback, and every filesystem read-only
  except the fresh temporary working directory; otherwise the audit hook below is the only
  barrier, and `CodeResult.isolation` says which applied;
- when started as root and the interpreter is readable by others: dropping to uid/gid 65534
  (nobody), which also makes the process-count limit effective;
- a scrubbed environment (PATH, HOME = the temporary folder, LANG) and `python -I -S`.

Inside, the harness installs a Python audit hook before running the program: process
creation (fork, exec, spawn, subprocess, os.system), network calls (socket connect, bind,
sendto, name lookups), file writes, renames and deletions outside the working directory, and
loading ctypes (which could bypass the hook) raise PermissionError. The verdict comes back
on a dedicated pipe, not stdout. A wall-clock deadline in the parent kills the process group.

This contains damage and runaway resource use; it does not make the verdict unforgeable by an
adversarial program running in the same interpreter as its tests (no in-process test runner
can), which is why the harness is minimal and every failure mode is recorded.

    result = run_code("def add(a, b):\\n    return a + b\\n", "assert add(1, 2) == 3\\n")
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

NOBODY = 65534


@dataclass(frozen=True)
class SandboxLimits:
    wall_seconds: float = 10.0
    cpu_seconds: int = 5
    memory_bytes: int = 1024 * 1024 * 1024
    file_bytes: int = 1024 * 1024  # also the cap on captured stdout/stderr
    open_files: int = 64
    processes: int = 16


@dataclass(frozen=True)
class CodeResult:
    passed: bool
    status: str  # passed, failed, error, denied, timeout, memory, output_limit, crashed
    detail: str
    seconds: float
    isolation: str  # what applied, e.g. "net=namespace fs=read-only user=nobody"


_LAUNCHER = r'''
import ctypes, os, resource, stat, sys
cfg = dict(arg.split("=", 1) for arg in sys.argv[1:6])
verdict_fd = int(sys.argv[6])
def limit(res, value):
    value = int(value)
    try:
        resource.setrlimit(res, (value, value))
    except (ValueError, OSError):
        pass
limit(resource.RLIMIT_CPU, cfg["cpu"])
limit(resource.RLIMIT_AS, cfg["mem"])
limit(resource.RLIMIT_FSIZE, cfg["fsize"])
limit(resource.RLIMIT_NOFILE, cfg["nofile"])
limit(resource.RLIMIT_CORE, 0)
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
NEWNET, NEWNS, NEWUSER = 0x40000000, 0x00020000, 0x10000000
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
root = os.geteuid() == 0
isolation = []
if libc.unshare(NEWNET | NEWNS) == 0 or libc.unshare(NEWUSER | NEWNET | NEWNS) == 0:
    isolation.append("net=namespace")
    work = os.getcwd().encode()
    ok = (libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) == 0
          and libc.mount(work, work, None, MS_BIND, None) == 0
          and libc.mount(None, b"/", None, MS_BIND | MS_REMOUNT | MS_RDONLY, None) == 0)
    if ok:
        with open("/proc/self/mounts") as fh:
            points = {line.split()[1] for line in fh}
        for extra in ("/dev/shm", "/tmp", "/var/tmp", "/run"):
            if extra in points:  # other writable filesystems mounted on their own
                libc.mount(None, extra.encode(), None, MS_BIND | MS_REMOUNT | MS_RDONLY, None)
        os.chdir(work)  # the old cwd is on the now read-only mount; re-enter via the bind mount
    isolation.append("fs=read-only" if ok else "fs=audit-hook")
else:
    isolation += ["net=audit-hook", "fs=audit-hook"]
def world_usable(path):
    path = os.path.realpath(path)
    parts = path.split(os.sep)
    for i in range(2, len(parts) + 1):
        mode = os.stat(os.sep.join(parts[:i]) or os.sep).st_mode
        if stat.S_ISDIR(mode) and not mode & stat.S_IXOTH:
            return False
    return True
if root and world_usable(sys.executable) and world_usable(sys.base_prefix):
    os.setgroups([])
    os.setgid(%(nobody)d)
    os.setuid(%(nobody)d)
    isolation.append("user=nobody")
else:
    isolation.append("user=unchanged")
limit(resource.RLIMIT_NPROC, cfg["nproc"])
os.write(verdict_fd, (" ".join(isolation) + "\n").encode())
os.execv(sys.executable, [sys.executable, "-I", "-S", "-B", "harness.py", str(verdict_fd)])
''' % {"nobody": NOBODY}

_HARNESS = r'''
import errno, json, os, sys
VERDICT = int(sys.argv[1])
HOME = os.path.realpath(os.getcwd())
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
PROCESS = {"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
           "pty.spawn", "os.kill", "os.killpg"}
NETWORK = {"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
           "socket.gethostbyname", "socket.gethostbyaddr", "socket.__new__"}
PATHS = {"os.remove", "os.rmdir", "os.rename", "os.mkdir", "os.chmod", "os.chown", "os.symlink", "os.link",
         "os.truncate", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile"}
def inside(path):
    try:
        path = os.fsdecode(path) if not isinstance(path, int) else None
    except TypeError:
        return False
    if path is None:
        return True
    real = os.path.realpath(os.path.join(HOME, path))
    return real == HOME or real.startswith(HOME + os.sep)
def hook(event, args):
    if event in PROCESS:
        raise PermissionError(f"sandbox: {event} is denied")
    if event in NETWORK:
        raise PermissionError(f"sandbox: network access ({event}) is denied")
    if event == "import" and args and args[0] in ("ctypes", "_ctypes", "cffi", "_cffi_backend"):
        raise PermissionError("sandbox: ctypes is denied")
    if event == "open":
        path, mode, flags = args[0], args[1], args[2] if len(args) > 2 else 0
        writes = (mode is not None and any(c in mode for c in "wax+")) or bool((flags or 0) & WRITE_FLAGS)
        if writes and not inside(path):
            raise PermissionError(f"sandbox: writing {path!r} outside the sandbox directory is denied")
    if event in PATHS and args and not all(inside(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))):
        raise PermissionError(f"sandbox: {event} outside the sandbox directory is denied")
program = open("program.py").read()
tests = open("tests.py").read()
def report(status, detail=""):
    os.write(VERDICT, json.dumps({"status": status, "detail": detail[-2000:]}).encode())
    os.close(VERDICT)
sys.addaudithook(hook)
try:
    namespace = {"__name__": "__main__"}
    exec(compile(program, "program.py", "exec"), namespace)
    exec(compile(tests, "tests.py", "exec"), namespace)
except AssertionError as exc:
    report("failed", f"AssertionError: {exc}")
except PermissionError as exc:
    report("denied", f"{exc}")
except MemoryError:
    report("memory", "MemoryError")
except OSError as exc:
    report("output_limit" if exc.errno == errno.EFBIG else "error", f"{type(exc).__name__}: {exc}")
except BaseException as exc:
    report("error", f"{type(exc).__name__}: {exc}")
else:
    report("passed")
'''


def run_code(program: str, tests: str, limits: SandboxLimits = SandboxLimits()) -> CodeResult:
    """Run `program`, then `tests` (asserts) in the same namespace, contained; never raises
    for anything the program does."""
    work = Path(tempfile.mkdtemp(prefix="mergeaudit-sandbox-"))
    start = time.monotonic()
    read_fd, write_fd = os.pipe()
    try:
        (work / "program.py").write_text(program)
        (work / "tests.py").write_text(tests)
        (work / "harness.py").write_text(_HARNESS)
        if os.geteuid() == 0:
            os.chown(work, NOBODY, NOBODY)
            for f in work.iterdir():
                os.chown(f, NOBODY, NOBODY)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
        args = [f"cpu={limits.cpu_seconds}", f"mem={limits.memory_bytes}", f"fsize={limits.file_bytes}",
                f"nofile={limits.open_files}", f"nproc={limits.processes}", str(write_fd)]
        with open(work / "stdout.txt", "wb") as out, open(work / "stderr.txt", "wb") as err:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _LAUNCHER, *args], cwd=work, env=env,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, pass_fds=(write_fd,),
                                    start_new_session=True)
            os.close(write_fd)
            write_fd = -1
            try:
                proc.wait(timeout=limits.wall_seconds)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
        isolation, verdict = _read_verdict(read_fd)
        seconds = time.monotonic() - start
        return _classify(proc.returncode, timed_out, verdict, work, seconds, isolation)
    finally:
        if write_fd >= 0:
            os.close(write_fd)
        os.close(read_fd)
        shutil.rmtree(work, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _read_verdict(fd: int) -> tuple[str, dict | None]:
    """The launcher's isolation line, then the harness's JSON verdict (None if it died first)."""
    chunks = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\n")
    try:
        return head.decode(errors="replace"), (json.loads(body) if body else None)
    except json.JSONDecodeError:
        return head.decode(errors="replace"), None


def _classify(code: int | None, timed_out: bool, verdict: dict | None, work: Path, seconds: float,
              isolation: str) -> CodeResult:
    def tail(name: str) -> str:
        try:
            return (work / name).read_bytes()[-500:].decode(errors="replace")
        except OSError:
            return ""

    if timed_out:
        return CodeResult(False, "timeout", "wall-clock deadline exceeded", seconds, isolation)
    if code is not None and code < 0:
        sig = -code
        status = {signal.SIGXCPU: "timeout", signal.SIGKILL: "timeout", signal.SIGXFSZ: "output_limit",
                  signal.SIGSEGV: "crashed"}.get(sig, "crashed")
        return CodeResult(False, status, f"killed by {signal.Signals(sig).name}", seconds, isolation)
    if verdict is None:
        detail = tail("stderr.txt").strip().splitlines()
        return CodeResult(False, "error", (detail[-1] if detail else f"exit status {code}")[:500], seconds, isolation)
    status = verdict.get("status", "error")
    return CodeResult(status == "passed", status, verdict.get("detail", ""), seconds, isolation)
