"""The code sandbox holds as root: every escape of issue 13 is tried against it and fails.

Escape attempts run with the in-process audit hook left out (`audit_hook=False`), as an attacker
who switched it off would; the hook itself is tested separately. Every hostile program is capped
(small wall clock, CPU, memory and a process limit), and loops that spawn are bounded, so a
containment failure cannot endanger the machine. Each test checks what the program could reach
from the outside too: a canary file, processes left behind (by a marker in their argv), the
evaluating process and a sentinel process still alive.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
import uuid

import pytest

from mergeaudit.evaluation.isolation import NOBODY
from mergeaudit.evaluation.sandbox import IsolationError, SandboxLimits, require_isolation, run_code
from mergeaudit.evaluation.settings import EvalSettings

LIMITS = SandboxLimits(wall_seconds=6, cpu_seconds=2, memory_bytes=512 * 1024**2, file_bytes=256 * 1024, processes=8)
STRONG = "bwrap kuid=65534 user=nobody caps=none nnp pid=ns net=none fs=ro env=empty nproc=9"


pytestmark = pytest.mark.usefixtures("bwrap")


def with_marker(cmd: str = "") -> str:
    return f"mergeaudit-test-{uuid.uuid4().hex[:12]}{cmd}"


def processes_with(marker: str, exact: bool = False) -> list[int]:
    """Pids whose argv holds `marker` (as a whole argument when `exact`)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmdline = fh.read()
        except OSError:
            continue
        if (marker.encode() in cmdline.split(b"\0")) if exact else (marker.encode() in cmdline):
            found.append(int(pid))
    return found


def test_a_correct_program_passes_and_a_wrong_one_fails():
    ok = run_code("def add(a, b):\n    return a + b\n", "assert add(1, 2) == 3\n", LIMITS)
    assert ok.passed and ok.status == "passed"
    assert ok.isolation == STRONG + " hook" if os.geteuid() == 0 else ok.isolation.startswith("bwrap kuid=")
    bad = run_code("def add(a, b):\n    return a - b\n", "assert add(1, 2) == 3\n", LIMITS)
    assert not bad.passed and bad.status == "failed" and "add(1, 2) returned -1" in bad.detail


@pytest.mark.parametrize(
    "program,statuses",
    [
        ("import os\nwhile True:\n    os.fork()\n", {"denied"}),
        ("import subprocess\nsubprocess.run(['sh', '-c', 'echo hi'])\n", {"denied"}),
        ("import os\nos.system('true')\n", {"denied"}),
        ("import _posixsubprocess\n", {"denied"}),
        ("import multiprocessing\nmultiprocessing.Process(target=print).start()\n", {"denied"}),
        ("import gc\ngc.get_objects()\n", {"denied"}),
        ("while True:\n    pass\n", {"timeout"}),
        ("import time\ntime.sleep(60)\n", {"timeout"}),
        ("while True:\n    print('x' * 10000)\n", {"output_limit"}),
        ("x = bytearray(8 * 1024**3)\n", {"memory"}),
        ("import ctypes\n", {"denied"}),
        ("def f(:\n", {"error"}),
    ],
    ids=[
        "fork-bomb",
        "subprocess",
        "os-system",
        "posixsubprocess",
        "multiprocessing",
        "gc",
        "infinite-loop",
        "sleep",
        "output-flood",
        "memory",
        "ctypes",
        "syntax",
    ],
)
def test_escapes_are_stopped_and_recorded(program, statuses):
    result = run_code(program, "", LIMITS)
    assert not result.passed
    assert result.status in statuses, result
    assert result.seconds < LIMITS.wall_seconds + 3


def test_the_hook_keeps_its_state_out_of_the_programs_reach():
    """Issue 13: one line cleared the harness's module-level sets and switched the hook off."""
    attack = (
        "import __main__, sys\n"
        "for value in list(vars(__main__).values()):\n"
        "    try:\n        value.clear()\n    except Exception:\n        pass\n"
        "frame = sys._getframe()\n"
        "while frame is not None:\n"
        "    for value in list(frame.f_locals.values()):\n"
        "        if callable(value) and getattr(value, '__defaults__', None):\n"
        "            try:\n                value.__defaults__ = None\n            except Exception:\n"
        "                pass\n"
        "    frame = frame.f_back\n"
        "import os\nos.fork()\n"
    )
    result = run_code(attack, "", LIMITS)
    assert result.status == "denied" and "os.fork" in result.detail, result


def test_writes_outside_the_work_folder_are_denied(tmp_path):
    target = tmp_path / "escaped.txt"
    for program in (
        f"open({str(target)!r}, 'w').write('x')\n",
        f"import os\nos.rename('/task/program.py', {str(target)!r})\n",
        "open('/tmp/mergeaudit-escape-probe', 'w').write('x')\n",
    ):
        assert run_code(program, "", LIMITS).status == "denied"
    assert not target.exists() and not os.path.exists("/tmp/mergeaudit-escape-probe")
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
        unhooked = run_code(
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n", "", LIMITS, audit_hook=False
        )
        assert unhooked.status == "error" and "ConnectionRefused" in unhooked.detail, unhooked  # its own loopback
        with pytest.raises(TimeoutError):
            server.accept()


def test_the_program_runs_unprivileged_alone_and_without_secrets(monkeypatch):
    """Measured by the program itself, hook off: uid 65534, no capabilities, only its own
    processes, loopback only, no host folders, an empty environment; and from the outside,
    while it runs: as root, every sandbox process has uid 65534 on this machine too (so the
    process limit binds)."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-of-the-parent")
    program = (
        "import os, socket, time\n"
        "status = dict(line.split(':', 1) for line in open('/proc/self/status'))\n"
        "ids = [os.getuid(), os.geteuid(), os.getgid()]\n"
        "caps = [status[k].strip() for k in ('CapEff', 'CapPrm', 'CapBnd', 'CapAmb')]\n"
        "nnp = status['NoNewPrivs'].strip()\n"
        "pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
        "interfaces = [name for _, name in socket.if_nameindex()]\n"
        "top = sorted(os.listdir('/'))\n"
        "seen = ''\n"
        "for pid in ['self', '1', str(os.getppid())] + [p for p in os.listdir('/proc') if p.isdigit()]:\n"
        "    try:\n        seen += open('/proc/%s/environ' % pid, 'rb').read().decode()\n"
        "    except OSError:\n        pass\n"
        "names = sorted(os.environ)\n"
        "time.sleep(1)\n"
    )
    tests = (
        "assert ids == [65534, 65534, 65534]\n"
        "assert caps == ['0000000000000000'] * 4\n"
        "assert nnp == '1'\n"
        "assert pids == [1, 2]\n"
        "assert interfaces == ['lo']\n"
        "assert 'etc' not in top and 'home' not in top and 'tmp' not in top and 'work' in top\n"
        "assert 's3cr3t' not in seen and 'AWS' not in seen\n"
        "assert set(names) <= {'PATH', 'HOME', 'TMPDIR', 'LANG', 'PWD', 'LC_CTYPE'}\n"
    )
    uids: dict[int, str] = {}
    stop = threading.Event()

    def watch() -> None:  # the sandbox's processes, as this machine sees them
        while not stop.is_set():
            for pid in processes_with("/task/sandbox_harness.py", exact=True):  # bwrap and inside
                try:
                    with open(f"/proc/{pid}/status") as fh:
                        uids[pid] = next(line for line in fh if line.startswith("Uid:")).split(None, 1)[1].strip()
                except (OSError, StopIteration):
                    pass
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = run_code(program, tests, LIMITS, audit_hook=False)
    finally:
        stop.set()
        watcher.join()
    assert result.passed, result
    outside = NOBODY if os.geteuid() == 0 else os.geteuid()  # root drops to 65534 before bwrap
    assert uids and set(uids.values()) == {"\t".join([str(outside)] * 4)}, uids


def test_a_bounded_fork_bomb_stops_at_the_process_limit():
    marker = with_marker()
    program = (
        "import os\n"
        "forked = 0\n"
        "for _ in range(64):\n"
        "    try:\n        pid = os.fork()\n    except OSError:\n        break\n"
        "    if pid == 0:\n"
        f"        os.execv('/usr/bin/sleep', ['{marker}', '30'])\n"
        "    forked += 1\n"
        "import resource\n"
        "try:\n"
        "    resource.setrlimit(resource.RLIMIT_NPROC, (4096, 4096))\n    raised = True\n"
        "except (ValueError, OSError):\n    raised = False\n"
    )
    start = time.monotonic()
    result = run_code(program, "assert forked == 7\nassert not raised\n", LIMITS, audit_hook=False)
    assert result.passed, result
    assert time.monotonic() - start < 5
    assert processes_with(marker) == []


@pytest.mark.parametrize("how", ["setsid-double-fork", "posixsubprocess", "multiprocessing"])
def test_no_process_outlives_the_sandbox_and_none_blocks_it(how):
    """Each child keeps the results file open and sleeps 30 s: the run still ends at once and
    the child is gone (its pid namespace ended with the sandbox)."""
    marker = with_marker()
    spawn = {
        "setsid-double-fork": (
            "import os\n"
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            "    if os.fork() == 0:\n"
            f"        os.execv('/usr/bin/sleep', ['{marker}', '30'])\n"
            "    os._exit(0)\n"
        ),
        "posixsubprocess": (
            "import subprocess\n"
            f"subprocess.Popen(['{marker}', '30'], executable='/usr/bin/sleep', start_new_session=True,\n"
            "                 close_fds=False)\n"
        ),
        "multiprocessing": (
            "import multiprocessing, os\n"
            "ctx = multiprocessing.get_context('fork')\n"
            f"ctx.Process(target=os.execv, args=('/usr/bin/sleep', ['{marker}', '30'])).start()\n"
        ),
    }[how]
    program = spawn + "import time\ntime.sleep(0.5)\nx = 1\n"
    result = run_code(program, "assert x == 1\n", LIMITS, audit_hook=False)
    assert result.passed, result
    assert result.seconds < 4
    assert processes_with(marker) == []


def test_a_wall_clock_deadline_kills_the_whole_sandbox():
    marker = with_marker()
    program = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        f"    os.execv('/usr/bin/sleep', ['{marker}', '30'])\n"
        "time.sleep(30)\n"
    )
    result = run_code(
        program, "", SandboxLimits(wall_seconds=1.5, cpu_seconds=2, memory_bytes=512 * 1024**2), audit_hook=False
    )
    assert result.status == "timeout" and result.seconds < 4.5, result
    assert processes_with(marker) == []


def test_the_evaluator_and_other_processes_survive_signals():
    sentinel = subprocess.Popen(["sleep", "30"])
    try:
        program = (
            "import os, signal\n"
            "sent = []\n"
            f"for pid in (os.getppid(), 1, {os.getpid()}, {sentinel.pid}):\n"
            "    try:\n        os.kill(pid, signal.SIGKILL)\n        sent.append(pid)\n"
            "    except OSError:\n        pass\n"
            f"for pid in ({os.getpid()}, {sentinel.pid}, os.getppid()):\n"
            "    try:\n        signal.pidfd_send_signal(os.pidfd_open(pid), signal.SIGKILL)\n"
            "    except OSError:\n        pass\n"
            "try:\n    os.kill(-1, signal.SIGKILL)\nexcept OSError:\n    pass\n"
        )
        result = run_code(program, "", LIMITS, audit_hook=False)
        assert result.status in ("passed", "crashed"), result  # it may kill itself, nothing else
        assert sentinel.poll() is None
    finally:
        sentinel.kill()
        sentinel.wait()


def test_nothing_outside_the_work_folder_changes(tmp_path):
    canary = tmp_path / "canary.txt"
    canary.write_text("original")
    before = sorted(os.listdir(tmp_path)), sorted(os.listdir("/tmp"))
    program = (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]\n"
        "escaped = []\n"
        f"for path in [{str(canary)!r}, '/proc/1/root{canary}', '/proc/self/root{canary}', '/usr/lib/x',\n"
        "             '/x', '/dev/x', '/task/x', '/tmp/mergeaudit-canary', '/work/../x']:\n"
        "    try:\n        open(path, 'w').write('changed')\n        escaped.append(path)\n"
        "    except OSError:\n        pass\n"
        f"for path in [{str(canary)!r}, '/task/program.py']:\n"
        "    try:\n        os.remove(path)\n        escaped.append('rm ' + path)\n"
        "    except OSError:\n        pass\n"
        "MS_REMOUNT, MS_BIND = 32, 4096\n"
        "for point in (b'/', b'/usr', b'/task', b'/proc'):\n"
        "    if libc.mount(None, point, None, MS_REMOUNT | MS_BIND, None) == 0:\n"
        "        escaped.append('remount ' + point.decode())\n"
        "if libc.mount(b'none', b'/work', b'tmpfs', 0, None) == 0:\n    escaped.append('mount')\n"
        "for flag in (0x10000000, 0x00020000, 0x40000000):  # new user, mount, network namespaces\n"
        "    if libc.unshare(flag) == 0:\n        escaped.append('unshare %x' % flag)\n"
        "for ns in ('mnt', 'net', 'pid', 'user', 'ipc', 'uts', 'cgroup'):\n"
        "    for pid in ('1', 'self'):\n"
        "        try:\n            fd = os.open('/proc/%s/ns/%s' % (pid, ns), os.O_RDONLY)\n"
        "        except OSError:\n            continue\n"
        "        if libc.setns(fd, 0) == 0:\n            escaped.append('setns %s %s' % (pid, ns))\n"
        "for call in (lambda: os.setuid(0), lambda: os.setgid(0), lambda: os.chroot('/work')):\n"
        "    try:\n        call()\n        escaped.append('privileged call')\n"
        "    except OSError:\n        pass\n"
        "open('/work/mine.txt', 'w').write('fine')\n"
    )
    result = run_code(program, "assert escaped == []\n", LIMITS, audit_hook=False)
    assert result.passed, result
    assert canary.read_text() == "original"
    assert (sorted(os.listdir(tmp_path)), sorted(os.listdir("/tmp"))) == before


def test_minimum_isolation_is_enforced(monkeypatch):
    assert EvalSettings().code_isolation == "bwrap"
    with pytest.raises(ValueError):
        EvalSettings(code_isolation="none")
    assert require_isolation("bwrap").startswith("bwrap ")
    monkeypatch.setenv("MERGEAUDIT_BWRAP", "/nonexistent/bwrap")  # as on a machine without it
    with pytest.raises(IsolationError, match="bubblewrap"):
        run_code("x = 1\n", "assert x == 1\n", LIMITS)
    with pytest.raises(IsolationError, match="bubblewrap"):
        require_isolation("bwrap")
    weak = run_code("x = 1\n", "assert x == 1\n", SandboxLimits(wall_seconds=6, minimum_isolation="best_effort"))
    assert weak.passed and weak.isolation.startswith("launcher ") and "pid=host" in weak.isolation
    if os.geteuid() == 0:  # the fallback cannot drop root when the interpreter lives under /root
        assert "user=nobody" in weak.isolation or "nproc=unbound" in weak.isolation, weak.isolation
    with pytest.raises(IsolationError, match="unknown minimum"):
        run_code("x = 1\n", "", SandboxLimits(minimum_isolation="none"))
