"""How the code sandbox is started, and what its isolation measured.

Preferred: bubblewrap (`bwrap`, Debian package `bubblewrap`; `make test` installs it). The
sandbox gets new user, pid, network, ipc, uts and cgroup namespaces (`--unshare-all`), uid/gid
65534 with no capabilities (`--cap-drop ALL`, NoNewPrivs), no further user namespaces
(`--disable-userns` where bwrap has it), a root of its own that is read-only (`--remount-ro /`)
holding only /usr (and the /bin, /lib* links or folders), the interpreter's prefix read-only, the
task files read-only at /task, a size-capped tmpfs at /work, a new /proc (only its own
processes) and a minimal read-only /dev; an empty environment but PATH/HOME/TMPDIR/LANG;
`--die-with-parent` and `--new-session`. When its pid 1 ends, the kernel kills every process in
the namespace, so nothing the program starts outlives it.

bwrap run by root maps the sandbox user to uid 0 outside, where RLIMIT_NPROC does not bind
(measured: 40 forks under a limit of 10). So when the evaluating process is root, a small launcher
(`_ROOT_LAUNCHER`) first enters a private mount namespace, bind-mounts the interpreter's prefix
(often under a private home such as /root/.pyenv) at a path uid 65534 can reach inside the job
folder, drops to uid/gid 65534 with no groups, and only then executes bwrap with an empty
environment: the sandbox runs as uid 65534 outside too, and the process limit binds (measured:
the 9th fork fails under a limit of 10). An unprivileged caller runs bwrap directly.

Fallback (only when `SandboxLimits.minimum_isolation` is "best_effort" and bwrap is missing or
does not start): the former launcher, which tries new network and mount namespaces and a
read-only remount, and drops to nobody only when the interpreter is reachable by others; the
harness's measurements then say what held, usually little as root.

`describe` turns the measurements (made by the launcher, and by the harness inside before the
program runs) into `CodeResult.isolation`, e.g.
"bwrap kuid=65534 uid=65534 caps=none nnp pid=ns net=none fs=ro env=empty nproc=17 hook".
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from mergeaudit.errors import IsolationError

NOBODY = 65534
MINIMUM_LEVELS = ("bwrap", "best_effort")
SANDBOX_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/work", "TMPDIR": "/work", "LANG": "C.UTF-8"}


def bwrap_path() -> str | None:
    """The bwrap binary: $MERGEAUDIT_BWRAP when set (a path; one that does not exist means
    "not installed"), else bwrap on PATH or /usr/bin/bwrap."""
    configured = os.environ.get("MERGEAUDIT_BWRAP")
    if configured is not None:
        return configured if os.access(configured, os.X_OK) else None
    return shutil.which("bwrap") or ("/usr/bin/bwrap" if os.access("/usr/bin/bwrap", os.X_OK) else None)


@functools.cache
def bwrap_options(path: str) -> frozenset[str]:
    """The options this bwrap knows (0.8.0 has --disable-userns and --size; older ones may not)."""
    try:
        out = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=10, env={})
    except (OSError, subprocess.TimeoutExpired):
        return frozenset()
    return frozenset(w for w in (out.stdout + out.stderr).split() if w.startswith("--"))


def job_parent() -> str:
    """Where job folders go: the temporary folder, unless uid 65534 (bwrap run by root drops to
    it) cannot reach it; then /tmp."""
    tmp = os.path.realpath(tempfile.gettempdir())
    parts = tmp.split(os.sep)
    reachable = all(os.stat(os.sep.join(parts[:i]) or os.sep).st_mode & 0o001 for i in range(1, len(parts) + 1))
    return tmp if reachable or os.geteuid() != 0 else "/tmp"


def interpreter() -> tuple[str, str]:
    """The real interpreter binary and its installation prefix (the sandbox needs the stdlib,
    not site-packages: it runs `-I -S`)."""
    prefix = os.path.realpath(sys.base_prefix)
    exe = os.path.realpath(sys.executable)
    if not exe.startswith(prefix + os.sep):  # a venv with copied binaries
        exe = os.path.join(prefix, "bin", f"python{sys.version_info.major}.{sys.version_info.minor}")
    return exe, prefix


def bwrap_launch(job: Path, info_fd: int, work_bytes: int) -> tuple[list[str], dict[str, str] | None]:
    """The command that starts bwrap for `job` (task files in job/in), and for root the
    launcher's spec; the sandbox runs job/in/sandbox_harness.py with cwd /work."""
    bwrap = bwrap_path()
    if bwrap is None:
        raise IsolationError("bubblewrap (bwrap) is not installed")
    known = bwrap_options(bwrap)
    exe, prefix = interpreter()
    as_root = os.geteuid() == 0
    argv = [bwrap, "--unshare-all", "--unshare-user"]
    if "--disable-userns" in known:
        argv.append("--disable-userns")
    argv += [
        "--uid",
        str(NOBODY),
        "--gid",
        str(NOBODY),
        "--hostname",
        "sandbox",
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
        "--clearenv",
        "--info-fd",
        str(info_fd),
    ]
    for key, value in SANDBOX_ENV.items():
        argv += ["--setenv", key, value]
    argv += ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    binds = []
    if not prefix.startswith("/usr/"):
        source = prefix
        if as_root:  # reachable by uid 65534 only through the launcher's bind mount
            source = str(job / "py")
            os.mkdir(source, 0o755)
            binds.append((prefix, source))
        argv += ["--ro-bind", source, prefix]
    argv += ["--ro-bind", str(job / "in"), "/task"]
    if "--size" in known:
        argv += ["--size", str(work_bytes)]
    argv += [
        "--tmpfs",
        "/work",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--remount-ro",
        "/dev",
        "--remount-ro",
        "/",
        "--chdir",
        "/work",
        exe,
        "-I",
        "-S",
        "-B",
        "/task/sandbox_harness.py",
        "/task",
    ]
    if not as_root:
        return argv, None
    return argv, {"binds": binds}


_ROOT_LAUNCHER = r"""
import ctypes, json, os, sys
spec = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
def check(ok, what):
    if not ok:
        sys.stderr.write("mergeaudit sandbox launcher: " + what + ": " + os.strerror(ctypes.get_errno()) + "\n")
        sys.exit(125)
CLONE_NEWNS, MS_BIND, MS_REC, MS_PRIVATE = 0x00020000, 4096, 1 << 14, 1 << 18
check(libc.unshare(CLONE_NEWNS) == 0, "unshare(CLONE_NEWNS)")
check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) == 0, "making mounts private")
for source, target in spec["binds"]:
    check(libc.mount(source.encode(), target.encode(), None, MS_BIND | MS_REC, None) == 0, "bind " + source)
os.setgroups([])
os.setresgid(@NOBODY@, @NOBODY@, @NOBODY@)
os.setresuid(@NOBODY@, @NOBODY@, @NOBODY@)
record = {"launcher": {"resuid": os.getresuid(), "resgid": os.getresgid(), "groups": os.getgroups()}}
os.write(spec["isolation_fd"], (json.dumps(record) + "\n").encode())
os.execve(spec["argv"][0], spec["argv"], {})
""".replace("@NOBODY@", str(NOBODY))


def command(kind: str, job: Path, fds: dict[str, int], work_bytes: int) -> list[str]:
    """The argv that starts the sandbox of `kind` ("bwrap" or "launcher") for `job`."""
    if kind == "launcher":
        return [sys.executable, "-I", "-S", "-c", _FALLBACK_LAUNCHER, str(job / "in"), str(job / "work")]
    argv, spec = bwrap_launch(job, fds["info"], work_bytes)
    if spec is None:
        return argv
    spec.update(argv=argv, isolation_fd=fds["isolation"])
    return [sys.executable, "-I", "-S", "-c", _ROOT_LAUNCHER, json.dumps(spec)]


_FALLBACK_LAUNCHER = r"""
import ctypes, os, stat, sys
task, work = sys.argv[1], sys.argv[2]
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
NEWNET, NEWNS, NEWUSER = 0x40000000, 0x00020000, 0x10000000
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
if libc.unshare(NEWNET | NEWNS) == 0 or libc.unshare(NEWUSER | NEWNET | NEWNS) == 0:
    w = work.encode()
    if (libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) == 0 and libc.mount(w, w, None, MS_BIND, None) == 0
            and libc.mount(None, b"/", None, MS_BIND | MS_REMOUNT | MS_RDONLY, None) == 0):
        with open("/proc/self/mounts") as fh:
            points = {line.split()[1] for line in fh}
        for extra in ("/dev/shm", "/tmp", "/var/tmp", "/run"):
            if extra in points:
                libc.mount(None, extra.encode(), None, MS_BIND | MS_REMOUNT | MS_RDONLY, None)
os.chdir(work)
def world_usable(path):
    parts = os.path.realpath(path).split(os.sep)
    return all(not stat.S_ISDIR(m) or m & stat.S_IXOTH for m in
               (os.stat(os.sep.join(parts[:i]) or os.sep).st_mode for i in range(2, len(parts) + 1)))
if os.geteuid() == 0 and world_usable(sys.executable) and world_usable(sys.base_prefix) and world_usable(task):
    os.setgroups([])
    os.setgid(@NOBODY@)
    os.setuid(@NOBODY@)
env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
os.execve(sys.executable, [sys.executable, "-I", "-S", "-B", os.path.join(task, "sandbox_harness.py"), task], env)
""".replace("@NOBODY@", str(NOBODY))


def describe(kind: str, records: list[dict], hook: bool) -> tuple[str, list[str]]:
    """`CodeResult.isolation` from the measurements, and the harness's list of missing
    requirements. Only what was measured is claimed."""
    launcher = next((r["launcher"] for r in records if "launcher" in r), None)
    facts = next((r["harness"] for r in records if "harness" in r), None)
    if facts is None:
        return f"{kind} (not measured)", ["measurement"]
    uid = facts["resuid"][0]
    if kind == "bwrap":  # the uid outside: the launcher's (root drops to 65534) or ours
        kuid = launcher["resuid"][0] if launcher is not None else os.geteuid()
    else:  # no user namespace as root: the uid inside is the uid outside
        kuid = uid if os.geteuid() == 0 else os.geteuid()
    parts = [kind, f"kuid={kuid}"]
    parts.append("user=nobody" if uid == NOBODY else "user=root" if uid == 0 else f"user={uid}")
    zero = "0000000000000000"
    no_caps = facts["cap_eff"] == facts["cap_prm"] == zero
    parts.append("caps=none" if no_caps else f"caps={facts['cap_eff']}")
    if facts["no_new_privs"] == "1":
        parts.append("nnp")
    own_pid_ns = facts["pid1"] == "bwrap" and len(facts["visible_pids"]) <= 2
    parts.append("pid=ns" if own_pid_ns else "pid=host")
    parts.append("net=none" if facts["interfaces"] in ([], ["lo"]) else "net=host")
    ro = facts["root_ro"] and facts["usr_ro"] and facts["prefix_ro"]
    parts.append(("fs=ro" if no_caps else "fs=ro(revocable)") if ro else "fs=rw")  # caps can remount
    parts.append("env=empty" if set(facts["env"]) <= set(SANDBOX_ENV) | {"PWD", "LC_CTYPE"} else "env=inherited")
    nproc = facts["limits"]["RLIMIT_NPROC"]
    parts.append(f"nproc={nproc}" if kuid != 0 else "nproc=unbound")  # the kernel ignores it for uid 0
    if hook:
        parts.append("hook")
    missing = list(facts.get("missing", []))
    if kind == "bwrap" and kuid == 0:
        missing.append("unprivileged uid outside the user namespace")
    return " ".join(parts), missing
