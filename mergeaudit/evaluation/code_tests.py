"""Unit tests of code tasks, split so that the verdict is decided outside the sandbox.

A program's tests are `assert` statements (HumanEval's `def check(candidate): assert ...` plus a
`check(entry_point)` line, or bare top-level asserts). `compile_tests` reads them with `ast` in the
evaluating process and cuts every assert into two parts:

- *probes*: the smallest sub-expressions that need the program (a call of `candidate` or of any
  name the tests do not bind, e.g. `add(1, 2)`, or a bare program variable). Only their source
  goes into the sandbox, which evaluates them and sends back their values in a strict primitive
  encoding (None, bool, int, float, str, list, tuple, dict, set, frozenset; exact types only);
- the rest of the assert (`== 3`, `abs(... - 0.33) < 1e-6`, `not ...`), which stays here and is
  evaluated by `evaluate` over the decoded values with a small interpreter of literals,
  arithmetic, comparisons and a few pure builtins; never `eval`.

So expected values never enter the sandbox and a value's `__eq__` is never consulted: the program
can only make a test pass by producing the expected data.

Supported shapes: at top level, `NAME = <literal expression>`, `def check(candidate):` (one
parameter, a body of asserts, `NAME = <expression>` and docstrings), `check(NAME)`, and asserts.
Anything else (loops, imports, helper functions, probes whose arguments depend on other probes,
`is` against anything but None/True/False) raises `UnsupportedTests`, scored "unsupported".

    plan = compile_tests("def check(candidate):\\n    assert candidate(1, 2) == 3\\n\\ncheck(add)\\n")
    plan.probes  # ['add(1, 2)']
"""

from __future__ import annotations

import ast
import math
import operator
from dataclasses import dataclass, field
from typing import Any

MAX_SIZE = 1_000_000  # elements or characters an expression here may build
MAX_DEPTH = 64

PURE_CALLS = {
    "abs": abs,
    "len": len,
    "round": round,
    "sum": sum,
    "min": min,
    "max": max,
    "sorted": sorted,
    "set": set,
    "frozenset": frozenset,
    "tuple": tuple,
    "list": list,
    "dict": dict,
    "int": int,
    "float": float,
    "str": str,
    "bool": bool,
    "all": all,
    "any": any,
}
PURE_ATTR_CALLS = {("math", "isclose"): math.isclose, ("math", "fabs"): math.fabs}
_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.BitAnd: operator.and_,
    ast.BitOr: operator.or_,
    ast.BitXor: operator.xor,
    ast.RShift: operator.rshift,
}
_CMPOPS = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
    ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
}


class UnsupportedTests(ValueError):
    """Tests whose shape cannot be split into sandboxed probes and a comparison here."""


class Probe(ast.expr):
    """A placeholder for the value of probe `index`, evaluated in the sandbox."""

    _fields = ("index",)


@dataclass
class TestPlan:
    probes: list[str] = field(default_factory=list)  # sources the sandbox evaluates, in order
    steps: list[tuple[str, str | None, ast.expr]] = field(default_factory=list)  # (kind, name, expr)
    env: dict[str, Any] = field(default_factory=dict)  # top-level literal bindings


def compile_tests(tests: str) -> TestPlan:
    """Split `tests` into probes and parent-side steps; raise UnsupportedTests when it cannot."""
    try:
        module = ast.parse(tests)
    except SyntaxError as exc:
        raise UnsupportedTests(f"the tests do not parse: {exc.msg} (line {exc.lineno})") from exc
    plan = TestPlan()
    checkers: dict[str, ast.FunctionDef] = {}
    for stmt in module.body:
        if isinstance(stmt, ast.FunctionDef):
            args = stmt.args
            if (
                len(args.args) != 1
                or args.vararg
                or args.kwarg
                or args.kwonlyargs
                or args.posonlyargs
                or args.defaults
                or stmt.decorator_list
            ):
                raise UnsupportedTests(
                    f"tests define a helper function {stmt.name!r}; only a checker "
                    "`def check(candidate):` with assert statements is supported"
                )
            checkers[stmt.name] = stmt
        elif (
            isinstance(stmt, ast.Expr)
            and isinstance(stmt.value, ast.Call)
            and isinstance(stmt.value.func, ast.Name)
            and stmt.value.func.id in checkers
        ):
            call = stmt.value
            if len(call.args) != 1 or call.keywords or not isinstance(call.args[0], ast.Name):
                raise UnsupportedTests(f"line {stmt.lineno}: a checker must be called with one name")
            checker = checkers[call.func.id]
            _body(checker.body, plan, {checker.args.args[0].arg: call.args[0].id}, top=False)
        else:
            _body([stmt], plan, {}, top=True)
    return plan


def _body(stmts: list[ast.stmt], plan: TestPlan, rename: dict[str, str], top: bool) -> None:
    local: set[str] = set()  # names bound to probe-dependent values (usable here, not in probes)
    for stmt in stmts:
        if isinstance(stmt, ast.Pass) or (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)):
            continue
        if isinstance(stmt, ast.Assert):
            plan.steps.append(("assert", ast.unparse(stmt.test), _split(stmt.test, plan, rename, local)))
        elif isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            name = stmt.targets[0].id
            if name in rename:
                raise UnsupportedTests(f"line {stmt.lineno}: the tests rebind the candidate {name!r}")
            split = _split(stmt.value, plan, rename, local)
            if top:
                if _has_probe(split):
                    raise UnsupportedTests(f"line {stmt.lineno}: a top-level binding must be a literal")
                plan.env[name] = evaluate(split, [], plan.env)
            else:
                plan.steps.append(("bind", name, split))
                local.add(name)
        else:
            kind = type(stmt).__name__
            raise UnsupportedTests(
                f"line {stmt.lineno}: {kind} statements are not supported in tests "
                "(only assert, NAME = expression and `check(entry_point)`)"
            )


def _has_probe(node: ast.AST) -> bool:
    return any(isinstance(n, Probe) for n in ast.walk(node))


def _pure(node: ast.expr, plan: TestPlan, rename: dict[str, str], local: set[str]) -> bool:
    """Whether `node` can be evaluated here (given probe values), without the program."""
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, ast.Name):
        return node.id in plan.env or node.id in local
    if isinstance(node, ast.Call):
        func = node.func
        known = (isinstance(func, ast.Name) and func.id in PURE_CALLS and func.id not in rename) or (
            isinstance(func, ast.Attribute)
            and isinstance(func.value, ast.Name)
            and (func.value.id, func.attr) in PURE_ATTR_CALLS
        )
        return known
    return isinstance(
        node,
        (
            ast.List,
            ast.Tuple,
            ast.Set,
            ast.Dict,
            ast.UnaryOp,
            ast.BinOp,
            ast.BoolOp,
            ast.Compare,
            ast.IfExp,
            ast.Subscript,
            ast.Slice,
        ),
    )


def _split(node: ast.expr, plan: TestPlan, rename: dict[str, str], local: set[str]) -> ast.expr:
    """`node` with every program-dependent sub-expression replaced by a Probe."""
    if _pure(node, plan, rename, local):
        if isinstance(node, ast.Compare):
            for op, left, right in zip(node.ops, [node.left, *node.comparators], node.comparators):
                if isinstance(op, (ast.Is, ast.IsNot)) and not any(
                    isinstance(x, ast.Constant)
                    and x.value in (None, True, False)
                    and type(x.value) in (type(None), bool)
                    for x in (left, right)
                ):
                    raise UnsupportedTests(f"`is` is only supported against None, True or False: {ast.unparse(node)}")
        if isinstance(node, ast.Call) and node.keywords and not all(k.arg for k in node.keywords):
            raise UnsupportedTests(f"**kwargs are not supported in tests: {ast.unparse(node)}")
        return _map_children(node, lambda child: _split(child, plan, rename, local))
    if isinstance(
        node,
        (
            ast.Lambda,
            ast.ListComp,
            ast.SetComp,
            ast.DictComp,
            ast.GeneratorExp,
            ast.NamedExpr,
            ast.Await,
            ast.Yield,
            ast.YieldFrom,
            ast.JoinedStr,
            ast.Starred,
        ),
    ):
        raise UnsupportedTests(f"{type(node).__name__} is not supported in tests: {ast.unparse(node)}")
    return _probe(node, plan, rename, local)


def _probe(node: ast.expr, plan: TestPlan, rename: dict[str, str], local: set[str]) -> Probe:
    """Register `node` (which needs the program) as a probe; its source names the entry point."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and sub.id in local:
            raise UnsupportedTests(f"a call depends on another call's result ({sub.id!r}): {ast.unparse(node)}")
        if isinstance(sub, (ast.Lambda, ast.NamedExpr, ast.Await, ast.Yield, ast.YieldFrom)):
            raise UnsupportedTests(f"{type(sub).__name__} is not supported in tests: {ast.unparse(node)}")

    class Substitute(ast.NodeTransformer):
        def visit_Name(self, name: ast.Name) -> ast.expr:
            if name.id in rename:
                return ast.copy_location(ast.Name(rename[name.id], ast.Load()), name)
            if name.id in plan.env:
                return ast.copy_location(_literal(plan.env[name.id], name.id), name)
            return name

    source = ast.unparse(Substitute().visit(_copy(node)))
    plan.probes.append(source)
    return Probe(len(plan.probes) - 1)


def _copy(node: ast.expr) -> ast.expr:
    return ast.parse(ast.unparse(node), mode="eval").body


def _literal(value: Any, name: str) -> ast.expr:
    text = repr(value)
    try:
        node = ast.parse(text, mode="eval").body
        if ast.literal_eval(node) != value:
            raise ValueError
    except (SyntaxError, ValueError) as exc:
        raise UnsupportedTests(f"{name!r} has no literal form to pass into the sandbox") from exc
    return node


def _map_children(node: ast.expr, fn) -> ast.expr:
    for name, value in ast.iter_fields(node):
        if isinstance(node, ast.Call) and name == "func":
            continue  # a pure function's name, resolved by `evaluate`
        if isinstance(value, ast.expr):
            setattr(node, name, fn(value))
        elif isinstance(value, list):
            setattr(node, name, [fn(v) if isinstance(v, ast.expr) else v for v in value])
    for kw in node.keywords if isinstance(node, ast.Call) else []:
        kw.value = fn(kw.value)
    return node


class TestFailure(Exception):
    """An assert that does not hold, or an expression here that cannot be evaluated."""


def evaluate(node: ast.expr, values: list[Any], env: dict[str, Any], depth: int = 0) -> Any:
    """The value of a split expression, given the probes' decoded values; never runs Python
    source. Sizes are bounded: no operation may build more than MAX_SIZE elements."""
    if depth > MAX_DEPTH:
        raise TestFailure("expression nested too deeply")

    def ev(n: ast.expr) -> Any:
        return evaluate(n, values, env, depth + 1)

    if isinstance(node, Probe):
        return values[node.index]
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in env:
            raise TestFailure(f"name {node.id!r} is not bound")
        return env[node.id]
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        items = [ev(e) for e in node.elts]
        return {ast.List: list, ast.Tuple: tuple, ast.Set: set}[type(node)](items)
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise TestFailure("dict unpacking is not supported")
        return {ev(k): ev(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.UnaryOp):
        v = ev(node.operand)
        ops = {ast.Not: operator.not_, ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Invert: operator.invert}
        return ops[type(node.op)](v)
    if isinstance(node, ast.BoolOp):
        result = None
        for value in node.values:
            result = ev(value)
            if (isinstance(node.op, ast.And) and not result) or (isinstance(node.op, ast.Or) and result):
                return result
        return result
    if isinstance(node, ast.BinOp):
        return _binop(type(node.op), ev(node.left), ev(node.right))
    if isinstance(node, ast.Compare):
        left = ev(node.left)
        for op, comparator in zip(node.ops, node.comparators):
            right = ev(comparator)
            if not _CMPOPS[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.IfExp):
        return ev(node.body) if ev(node.test) else ev(node.orelse)
    if isinstance(node, ast.Subscript):
        return ev(node.value)[ev(node.slice)]
    if isinstance(node, ast.Slice):
        return slice(*(ev(x) if x is not None else None for x in (node.lower, node.upper, node.step)))
    if isinstance(node, ast.Call):
        func = node.func
        fn = PURE_CALLS[func.id] if isinstance(func, ast.Name) else PURE_ATTR_CALLS[(func.value.id, func.attr)]
        args = [ev(a) for a in node.args]
        kwargs = {k.arg: ev(k.value) for k in node.keywords}
        if fn in (str, int) and args and isinstance(args[0], int) and abs(args[0]).bit_length() > 10_000:
            raise TestFailure("integer too large to convert")
        return fn(*args, **kwargs)
    raise TestFailure(f"{type(node).__name__} cannot be evaluated here")


def _size(v: Any) -> int:
    return len(v) if isinstance(v, (str, bytes, list, tuple)) else 1


def _binop(op: type, a: Any, b: Any) -> Any:
    if op is ast.Mult and isinstance(b, int) and _size(a) * max(b, 0) > MAX_SIZE:
        raise TestFailure("a repetition here would exceed the size bound")
    if op is ast.Mult and isinstance(a, int) and _size(b) * max(a, 0) > MAX_SIZE:
        raise TestFailure("a repetition here would exceed the size bound")
    if op is ast.Pow and isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a).bit_length() * b > 100_000:
        raise TestFailure("a power here would exceed the size bound")
    if op is ast.Mod and isinstance(a, str):
        raise TestFailure("string formatting is not evaluated here")
    if op not in _BINOPS:
        raise TestFailure(f"operator {op.__name__} is not evaluated here")
    return _BINOPS[op](a, b)
