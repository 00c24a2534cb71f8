"""Which complete checkpoints are new under some prefixes: the watcher's memory lives in the store.

The state is a JSON object `{checkpoint URI: fingerprint}` at `state_uri`, rewritten atomically
after every checkpoint announced, so a restarted watcher never announces a checkpoint twice (a
crash between announcing and recording announces it once more; announcements carry a stable
id derived from URI and fingerprint, so a receiver can drop the duplicate). A checkpoint whose
files change gets a new fingerprint and is announced again.

    for landed in new_checkpoints(["s3://ckpts/rl"], load_state(state_uri)):
        announce(landed); remember(state_uri, landed)
"""

from __future__ import annotations

import fnmatch
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from mergeaudit import store
from mergeaudit.checkpoint import discover
from mergeaudit.errors import ConfigError, StoreError
from mergeaudit.fields import check_name, check_store_uri

EVENT = "mergeaudit.checkpoint.landed"
RESOURCE_PREFIX = "mergeaudit.checkpoint."  # the on-checkpoint trigger matches `mergeaudit.checkpoint.*`
KINDS = ("rlvr", "sft", "base", "unknown")


@dataclass(frozen=True)
class Landed:
    uri: str
    name: str
    fingerprint: str
    prefix: str
    kind: str

    @property
    def event_id(self) -> uuid.UUID:
        return uuid.uuid5(uuid.NAMESPACE_URL, f"{self.uri}#{self.fingerprint}")

    def payload(self) -> dict[str, str]:
        return asdict(self)

    @property
    def resource_id(self) -> str:
        return f"{RESOURCE_PREFIX}{self.fingerprint}"


def event_problems(event: str, resource_id: str, payload: Mapping[str, Any]) -> list[str]:
    """Why an event would not start `merge-audit/on-checkpoint` (empty: it would). The contract:
    event `mergeaudit.checkpoint.landed`, a resource id under `mergeaudit.checkpoint.`, and a
    payload with the checkpoint's `name` (1-64 letters, digits, '_', '-', '.'), `uri` (a path or
    store URI) and `kind` (rlvr, sft, base or unknown)."""
    problems = []
    if event != EVENT:
        problems.append(f"event {event!r} is not {EVENT!r}")
    if not resource_id.startswith(RESOURCE_PREFIX) or resource_id == RESOURCE_PREFIX:
        problems.append(f"resource id {resource_id!r} does not match {RESOURCE_PREFIX}*")
    checks = {"name": check_name, "uri": check_store_uri}
    for key, check in checks.items():
        value = payload.get(key)
        if not isinstance(value, str):
            problems.append(f"payload.{key} is missing")
            continue
        try:
            check(value)
        except ValueError as exc:
            problems.append(f"payload.{key}: {exc}")
    if payload.get("kind") not in KINDS:
        problems.append(f"payload.kind {payload.get('kind')!r} is not one of {', '.join(KINDS)}")
    return problems


def check_landed(landed: Landed) -> None:
    """Refuse to announce a checkpoint whose event would not start the on-checkpoint audit."""
    problems = event_problems(EVENT, landed.resource_id, landed.payload())
    if problems:
        raise ConfigError(f"not announcing {landed.uri}: " + "; ".join(problems))


def relative_path(prefix: str, uri: str) -> str:
    """The checkpoint's path under its watched prefix (its folder name when outside it)."""
    return uri[len(prefix) :].strip("/") if uri.startswith(prefix) else store.basename(uri)


def checkpoint_name(prefix: str, uri: str) -> str:
    """A short, config-safe name from the checkpoint's path under its prefix."""
    rel = relative_path(prefix, uri)
    name = "".join(c if c.isalnum() or c in "_.-" else "-" for c in (rel or store.basename(uri)))
    return name.strip("-._")[:64].rstrip("-._") or "checkpoint"


def kind_rules(rules: Sequence[str] | None) -> list[tuple[str, str]]:
    """`PATTERN=KIND` rules, in order; a typo in a kind is refused now, not at the audit."""
    out = []
    for rule in rules or []:
        pattern, sep, kind = rule.rpartition("=")
        if not sep or not pattern or kind not in KINDS:
            raise ConfigError(f"kind rule {rule!r} must read PATTERN=KIND with KIND one of {', '.join(KINDS)}")
        out.append((pattern, kind))
    return out


def kind_of(prefix: str, uri: str, rules: Sequence[tuple[str, str]], default: str = "rlvr") -> str:
    """The training kind of a landed checkpoint: the first of the parsed `kind_rules` whose glob
    matches its whole path under the prefix (`*sft*=sft`, `grpo/*=rlvr`; `*` also matches `/`,
    as in fnmatch), else `default`."""
    rel = relative_path(prefix, uri)
    return next((kind for pattern, kind in rules if fnmatch.fnmatchcase(rel, pattern)), default)


def load_state(state_uri: str) -> dict[str, str]:
    try:
        return json.loads(store.read_bytes(state_uri)) if store.exists(state_uri) else {}
    except (StoreError, json.JSONDecodeError) as exc:
        raise StoreError(f"watcher state {state_uri} cannot be read: {exc}") from exc


def new_checkpoints(
    prefixes: list[str],
    state: dict[str, str],
    marker: str | None = None,
    kind: str = "rlvr",
    rules: Sequence[str] | None = None,
) -> list[Landed]:
    """Complete checkpoints under the prefixes that the state has not seen in this version,
    each with its kind (`kind_of`: the first matching rule, else `kind`)."""
    parsed = kind_rules(rules)
    out = []
    for prefix in prefixes:
        prefix = store.check_uri(prefix)
        for status in discover(prefix, marker=marker):
            if status.complete and state.get(status.uri) != status.fingerprint:
                out.append(
                    Landed(
                        status.uri,
                        checkpoint_name(prefix, status.uri),
                        status.fingerprint,
                        prefix,
                        kind_of(prefix, status.uri, parsed, kind),
                    )
                )
    return out


def remember(state_uri: str, landed: Landed) -> None:
    state = load_state(state_uri)
    state[landed.uri] = landed.fingerprint
    store.write_bytes(state_uri, json.dumps(state, indent=1, sort_keys=True).encode())
