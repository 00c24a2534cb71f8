"""YAML loading for untrusted configs: data only, bounded size, depth and alias expansion.

`yaml.safe_load` refuses code but not bombs: nine anchors of nine aliases each expand to 9^9
nodes, which PyYAML builds as shared objects in microseconds and pydantic or a JSON dump then
walks as a tree of hundreds of millions of nodes (3-4 GB before a MemoryError). `load_yaml`
counts, while composing, how many nodes the document has once every alias is expanded, and
refuses it beyond MAX_NODES before any Python object is built; it also refuses nesting deeper
than MAX_DEPTH (PyYAML composes recursively, and its scanner slows quadratically with open flow
brackets), recursive aliases, files over MAX_BYTES and bytes that are not UTF-8. Every refusal
is a one-line ConfigError.

    data = load_yaml(raw_bytes, source="audit.yaml")
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.events import AliasEvent
from yaml.resolver import Resolver

from mergeaudit.errors import ConfigError

MAX_BYTES = 4 * 1024 * 1024  # a config is a few kB; a grid or per-layer lists stay far below this
MAX_NODES = 10_000  # scalars + lists + mappings after expanding every alias
MAX_DEPTH = 64  # an AuditConfig nests about 6 deep
_BRACKETS = re.compile(r"[\[\]{}]")


class _BudgetExceeded(Exception):
    pass


if yaml.__with_libyaml__:
    from yaml._yaml import CParser

    class _SafeBase(Composer, SafeConstructor, Resolver, CParser):
        """libyaml's event parser (5x faster than PyYAML's: 0.2 vs 1.0 s for 10k nodes here)
        under PyYAML's composer, whose compose_node BoundedLoader can wrap."""

        def __init__(self, stream: str):
            CParser.__init__(self, stream)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)
            Composer.__init__(self)
else:  # pragma: no cover - PyYAML built without libyaml
    _SafeBase = yaml.SafeLoader


class BoundedLoader(_SafeBase):
    """A safe loader (SafeConstructor: plain data, no tags) that keeps a running count of the
    expanded node tree while composing."""

    def __init__(self, stream: str, max_nodes: int = MAX_NODES, max_depth: int = MAX_DEPTH):
        super().__init__(stream)
        self._max_nodes, self._max_depth = max_nodes, max_depth
        self._used = 0
        self._depth = 0
        self._sizes: dict[int, int] = {}  # id(node) -> expanded size, for finished nodes

    def _spend(self, n: int) -> None:
        self._used += n
        if self._used > self._max_nodes:
            raise _BudgetExceeded(
                f"has more than {self._max_nodes} nodes once aliases are expanded (a YAML "
                "alias bomb, or far larger than any config)"
            )

    def compose_node(self, parent, index):  # PyYAML's signature
        if self.check_event(AliasEvent):
            anchor = self.peek_event().anchor
            node = self.anchors.get(anchor)
            if node is not None:
                size = self._sizes.get(id(node))
                if size is None:  # the anchored node is still being composed: it contains itself
                    raise _BudgetExceeded(f"uses alias *{anchor} inside the node it names (a recursive alias)")
                self._spend(size)
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > self._max_depth:
            raise _BudgetExceeded(f"nests deeper than {self._max_depth} levels")
        before = self._used
        self._spend(1)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        self._sizes[id(node)] = self._used - before
        return node


def _bracket_depth(text: str) -> int:
    """Deepest nesting of flow brackets, counted before PyYAML sees them: its scanner looks
    ahead across every open bracket at a cost that grows with the depth (1 s for 1000 `[`).
    Brackets inside quotes or comments count too, so this over-estimates; no real config has
    more than MAX_DEPTH of them open."""
    depth = deepest = 0
    for m in _BRACKETS.finditer(text):
        depth += 1 if m.group() in "[{" else -1
        if depth > deepest:
            deepest = depth
            if deepest > MAX_DEPTH:
                break
    return deepest


def load_yaml(raw: bytes | str, source: str, max_nodes: int = MAX_NODES) -> Any:
    """Parse one YAML document of plain data; every failure is a one-line ConfigError."""
    if isinstance(raw, bytes):
        if len(raw) > MAX_BYTES:
            raise ConfigError(f"config file {source} is {len(raw)} bytes, more than the {MAX_BYTES} a config may have")
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"config file {source} is not UTF-8 text (byte {exc.start}: {raw[exc.start : exc.start + 1]!r})"
            ) from None
    if _bracket_depth(raw) > MAX_DEPTH:
        raise ConfigError(f"config file {source} is refused: it nests deeper than {MAX_DEPTH} levels")
    loader = BoundedLoader(raw, max_nodes=max_nodes)
    try:
        return loader.get_single_data()
    except _BudgetExceeded as exc:
        raise ConfigError(f"config file {source} is refused: it {exc}") from None
    except yaml.YAMLError as exc:
        first = " ".join(str(exc).split("\n")[0].split())
        raise ConfigError(f"config file {source} is not valid YAML: {first}") from None
    except RecursionError:  # belt and braces: MAX_DEPTH keeps PyYAML far below the limit
        raise ConfigError(f"config file {source} nests too deeply") from None
    except ValueError as exc:  # an integer over 4300 digits (int's max_str_digits), a date like 2024-13-45
        reason = str(exc).splitlines()[0].split(";")[0][:120]
        raise ConfigError(f"config file {source} holds a value that cannot be read ({reason})") from None
    finally:
        loader.dispose()
