"""The program side of the code sandbox: a script run inside it, never imported by mergeaudit.

`python -I -S -B sandbox_harness.py TASK_DIR` (cwd: the writable work folder), started by
`mergeaudit.evaluation.sandbox`. In order, before any model-written code runs, it:

1. applies the resource limits (CPU, address space, file size, open files, processes, no core);
2. measures its isolation from the inside (uid/gid, capabilities and NoNewPrivs from
   /proc/self/status, the processes it can see and what pid 1 is, network interfaces, whether
   `/`, /usr and the interpreter are read-only, the environment's names, the limits) and writes
   them to the isolation descriptor, which it then closes: the program cannot add to or change
   that record. When the plan requires isolation that is not there, it stops here;
3. installs an audit hook (optional, an extra layer) whose state lives in the hook's own default
   arguments (immutable), not in module globals; rebinding an attribute of the hook or of the
   harness functions it protects (`__defaults__`, `__code__`) is denied; `gc` traversal and
   imports of ctypes/_posixsubprocess are denied.

Then it runs `program.py`, evaluates each probe of `plan.json` in the program's namespace and
writes one line per probe to the results descriptor: the value in a strict primitive encoding, or
the exception it raised, or why it was refused. It decides nothing: the evaluating process reads
these lines after the sandbox is gone and compares values itself (`code_tests.evaluate`).
"""

import builtins
import json
import os
import resource
import socket
import sys

DENY_EVENTS = frozenset(
    {
        "os.fork",
        "os.forkpty",
        "os.system",
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
        "subprocess.Popen",
        "pty.spawn",
        "os.kill",
        "os.killpg",
        "socket.connect",
        "socket.bind",
        "socket.sendto",
        "socket.sendmsg",
        "socket.getaddrinfo",
        "socket.gethostbyname",
        "socket.gethostbyaddr",
        "socket.__new__",
        "gc.get_objects",
        "gc.get_referrers",
        "gc.get_referents",
        "ctypes.dlopen",
        "ctypes.addressof",
        "ctypes.cdata",
        "ctypes.call_function",
        "sys.setprofile",
        "sys.settrace",
    }
)
DENY_IMPORTS = frozenset(
    {
        "ctypes",
        "_ctypes",
        "cffi",
        "_cffi_backend",
        "_posixsubprocess",
        "_xxsubinterpreters",
        "_testcapi",
        "_testinternalcapi",
        "_testbuffer",
    }
)
PATH_EVENTS = frozenset(
    {
        "os.remove",
        "os.rmdir",
        "os.rename",
        "os.mkdir",
        "os.chmod",
        "os.chown",
        "os.symlink",
        "os.link",
        "os.truncate",
        "os.utime",
        "shutil.rmtree",
        "shutil.move",
        "shutil.copyfile",
    }
)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
MAX_DEPTH = 32
MAX_ITEMS = 200_000


def apply_limits(limits):
    for name, value in limits.items():
        value = int(value)
        resource.setrlimit(getattr(resource, name), (value, value))


def measure(task):
    status = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            status[key] = value.strip()
    pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    try:
        with open("/proc/1/cmdline", "rb") as fh:
            init = fh.read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        init = "?"

    def read_only(path):
        try:
            return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
        except OSError:
            return None

    prefix = os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))
    return {
        "resuid": list(os.getresuid()),
        "resgid": list(os.getresgid()),
        "groups": os.getgroups(),
        "cap_eff": status.get("CapEff"),
        "cap_prm": status.get("CapPrm"),
        "cap_bnd": status.get("CapBnd"),
        "no_new_privs": status.get("NoNewPrivs"),
        "seccomp": status.get("Seccomp"),
        "pid": os.getpid(),
        "visible_pids": pids[:64],
        "pid1": os.path.basename(init),
        "interfaces": sorted(name for _, name in socket.if_nameindex()),
        "root_ro": read_only("/"),
        "usr_ro": read_only("/usr"),
        "prefix_ro": read_only(prefix),
        "task_ro": read_only(task),
        "work_ro": read_only(os.getcwd()),
        "env": sorted(os.environ),
        "limits": {
            n: resource.getrlimit(getattr(resource, n))[0]
            for n in ("RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_NPROC", "RLIMIT_CORE")
        },
    }


def install_hook(home, protected=()):
    """The extra in-process layer. Everything the hook uses is bound in its default arguments now:
    rebinding module globals or builtins later changes nothing, and rebinding an attribute of the
    hook or of the `protected` harness functions (`__code__`, `__defaults__`, ...) raises."""

    def hook(
        event,
        args,
        _home=home,
        _sep=os.sep,
        _deny=DENY_EVENTS,
        _imports=DENY_IMPORTS,
        _paths=PATH_EVENTS,
        _write=WRITE_FLAGS,
        _realpath=os.path.realpath,
        _join=os.path.join,
        _fsdecode=os.fsdecode,
        _error=PermissionError,
        _type=type,
        _str=str,
        _bytes=bytes,
        _int=int,
        _len=len,
        _none=None,
        _protected=(),
    ):
        if event in _deny:
            raise _error("sandbox: " + event + " is denied")
        if event == "import":
            if args and _type(args[0]) is _str and args[0] in _imports:
                raise _error("sandbox: importing " + args[0] + " is denied")
            return
        if (event == "object.__setattr__" or event == "object.__delattr__") and args:
            for guarded in _protected:
                if args[0] is guarded:
                    raise _error("sandbox: changing the harness is denied")
            return
        if event == "open":
            mode, flags = args[1], (args[2] if _len(args) > 2 else 0)
            if (mode is not _none and _type(mode) is not _str) or (flags is not _none and _type(flags) is not _int):
                raise _error("sandbox: open with an unusual mode or flags is denied")
            writes = (mode is not _none and ("w" in mode or "a" in mode or "x" in mode or "+" in mode)) or (
                flags is not _none and flags & _write != 0
            )
            if not writes:
                return
            paths = args[:1]
        elif event in _paths:
            paths = args[:2]
        else:
            return
        for path in paths:
            if _type(path) is _int or path is _none:
                continue
            if _type(path) is not _str and _type(path) is not _bytes:
                raise _error("sandbox: " + event + " with an unusual path is denied")
            real = _realpath(_join(_home, _fsdecode(path)))
            if not (real == _home or real.startswith(_home + _sep)):
                raise _error("sandbox: " + event + " outside the work folder is denied: " + _fsdecode(path))

    hook.__defaults__ = hook.__defaults__[:-1] + ((hook, *protected),)
    sys.addaudithook(hook)


def make_encoder():
    """A strict encoder: exact primitive types only (a subclass or any other object is refused,
    so no `__eq__`, `__repr__` or `__iter__` of the program's is ever called); references to the
    builtins it uses are taken now, before the program can rebind them."""
    null_t, bool_t, int_t, float_t, str_t = type(None), bool, int, float, str
    list_t, tuple_t, dict_t, set_t, frozenset_t = list, tuple, dict, set, frozenset
    int_repr, float_repr, quote, join = int.__repr__, float.__repr__, json.encoder.encode_basestring_ascii, str.join
    items, type_of, name_of = dict.items, type, type.__dict__["__name__"].__get__
    specials = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}

    class Refused(Exception):
        pass

    def encode(value, depth=0, budget=None):
        budget = budget if budget is not None else [MAX_ITEMS]
        budget[0] -= 1
        if budget[0] < 0 or depth > MAX_DEPTH:
            raise Refused("size", "the value is too large or too deeply nested to compare")
        t = type_of(value)
        if t is null_t:
            return "null"
        if t is bool_t:
            return "true" if value else "false"
        if t is int_t:
            try:
                return int_repr(value)
            except ValueError:
                raise Refused("size", "the integer has too many digits to compare") from None
        if t is float_t:
            text = float_repr(value)
            return specials.get(text, text)
        if t is str_t:
            return quote(value)
        if t is list_t:
            return "[" + join(",", [encode(v, depth + 1, budget) for v in value]) + "]"
        if t is tuple_t or t is set_t or t is frozenset_t:
            tag = "tuple" if t is tuple_t else "set" if t is set_t else "frozenset"
            return '{"' + tag + '":[' + join(",", [encode(v, depth + 1, budget) for v in value]) + "]}"
        if t is dict_t:
            pairs = [
                "[" + encode(k, depth + 1, budget) + "," + encode(v, depth + 1, budget) + "]" for k, v in items(value)
            ]
            return '{"dict":[' + join(",", pairs) + "]}"
        raise Refused(
            "type", "the value is a " + name_of(t) + ", not a plain None/bool/int/float/str/list/tuple/dict/set"
        )

    return encode, Refused


BUILTIN_EXCEPTIONS = frozenset(
    v for v in vars(builtins).values() if isinstance(v, type) and issubclass(v, BaseException)
)


def describe(
    exc,
    type_of=type,
    builtin=BUILTIN_EXCEPTIONS,
    base_str=BaseException.__str__,
    name_of=type.__dict__["__name__"].__get__,
    is_subclass=issubclass,
):
    """The exception's type name, message, errno and whether it is an exit; a builtin type's own
    str(), else BaseException's (no __str__ of the program's class runs)."""
    t = type_of(exc)
    try:
        message = (t.__str__ if t in builtin else base_str)(exc)
        message = message if type_of(message) is str else ""
    except BaseException:  # noqa: BLE001 - an exception whose str() fails still gets recorded
        message = ""
    errno = exc.errno if t in builtin and is_subclass(t, OSError) else None
    return {
        "type": name_of(t),
        "message": message[:500],
        "errno": errno if type_of(errno) is int else None,
        "exit": is_subclass(t, (SystemExit, KeyboardInterrupt, GeneratorExit)),
    }


def main():
    task = sys.argv[1]
    with open(os.path.join(task, "plan.json")) as fh:
        plan = json.load(fh)
    with open(os.path.join(task, "program.py")) as fh:
        program = fh.read()
    apply_limits(plan["limits"])
    facts = measure(task)
    missing = (
        [
            need
            for need, ok in (
                ("unprivileged user", facts["resuid"][0] != 0 and facts["resuid"][1] != 0),
                ("no capabilities", facts["cap_eff"] == facts["cap_prm"] == "0000000000000000"),
                ("own pid namespace", facts["pid1"] == "bwrap" and len(facts["visible_pids"]) <= 2),
                ("no network", facts["interfaces"] in ([], ["lo"])),
                ("read-only filesystem", facts["root_ro"] and facts["usr_ro"] and facts["prefix_ro"]),
            )
            if not ok
        ]
        if plan["require"]
        else []
    )
    facts["missing"] = missing
    os.write(plan["isolation_fd"], (json.dumps({"harness": facts}) + "\n").encode())
    os.close(plan["isolation_fd"])
    if missing:
        os._exit(0)
    out, nonce, exit_now = plan["results_fd"], plan["nonce"], os._exit
    write, encode_str = os.write, json.encoder.encode_basestring_ascii
    encode, Refused = make_encoder()
    dumps, number = json.dumps, int.__repr__

    def send(line):
        try:
            write(out, ('{"n":' + encode_str(nonce) + "," + line + "}\n").encode())
        except OSError:  # the file-size limit: the evaluating process sees a full results file
            exit_now(0)

    probes = [compile(src, f"<test {i}>", "eval") for i, src in enumerate(plan["probes"])]
    if plan["hook"]:
        install_hook(os.path.realpath(os.getcwd()), (send, encode, describe))
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(program, "program.py", "exec"), namespace)
    except BaseException as exc:  # noqa: BLE001 - recorded, the evaluating process decides
        send('"kind":"program_error","error":' + dumps(describe(exc)))
        exit_now(0)
    for i, probe in enumerate(probes):
        try:
            value = eval(probe, namespace)
        except BaseException as exc:  # noqa: BLE001
            send('"kind":"raised","case":' + number(i) + ',"error":' + dumps(describe(exc)))
            continue
        try:
            send('"kind":"value","case":' + number(i) + ',"v":' + encode(value))
        except Refused as refused:
            why, message = refused.args
            send(
                '"kind":"refused","case":'
                + number(i)
                + ',"why":'
                + encode_str(why)
                + ',"message":'
                + encode_str(message)
            )
    send('"kind":"done"')
    exit_now(0)


if __name__ == "__main__":
    try:
        main()
    except BaseException:  # noqa: BLE001 - the harness failing before the program is a setup error
        import traceback

        traceback.print_exc()
        os._exit(70)
