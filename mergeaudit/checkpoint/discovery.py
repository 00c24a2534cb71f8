"""Discovery: which checkpoints live under a prefix, and which of them are complete.

A folder is a checkpoint candidate when it holds a config.json or weights. It is complete when
it opens cleanly (config present, `model.safetensors` or an index whose every shard is present,
every header valid and every file's size equal to what its header describes) and, when the
store uses a completion marker, the marker is there too. Hidden folders (staging areas of an
unfinished publish) are never candidates.

    for status in discover("s3://ckpts/rl-math", marker="_COMPLETE"):
        print(status.uri, status.complete, status.problem)
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from mergeaudit import store
from mergeaudit.checkpoint.reader import (
    CONFIG_FILE,
    INDEX_FILE,
    PICKLE_SUFFIXES,
    Checkpoint,
)
from mergeaudit.errors import MergeAuditError


@dataclass(frozen=True)
class CheckpointStatus:
    uri: str
    complete: bool
    fingerprint: str | None = None
    problem: str | None = None


def candidate_folders(prefix: str) -> list[str]:
    """URIs of the folders under prefix (itself included) that look like checkpoints."""
    loc = store.locate(prefix)
    with store.translate_errors(prefix, "list"):
        if loc.scheme == "s3":
            loc.fs.invalidate_cache()
        if not loc.fs.exists(loc.path):
            return []
        paths = loc.fs.find(loc.path)
    root = loc.path.rstrip("/")
    folders: set[str] = set()
    for path in paths:
        rel = posixpath.relpath(str(path), root)
        parts = rel.split("/")
        if any(p.startswith(".") for p in parts):
            continue
        name = parts[-1]
        if name in (CONFIG_FILE, INDEX_FILE) or name.endswith(".safetensors") or name.endswith(PICKLE_SUFFIXES):
            folders.add("/".join(parts[:-1]))
    return [store.join(loc.uri, f) if f not in ("", ".") else loc.uri for f in sorted(folders)]


def check_complete(uri: str, marker: str | None = None) -> CheckpointStatus:
    """Open (headers only) and report; never raises for a bad checkpoint."""
    try:
        ck = Checkpoint.open(uri)
    except MergeAuditError as exc:
        return CheckpointStatus(uri, False, problem=str(exc))
    if marker and marker not in ck.files:
        return CheckpointStatus(uri, False, ck.fingerprint, problem=f"completion marker {marker} is missing")
    return CheckpointStatus(uri, True, ck.fingerprint)


def discover(prefix: str, marker: str | None = None) -> list[CheckpointStatus]:
    """Every checkpoint candidate under prefix with its completeness."""
    return [check_complete(uri, marker) for uri in candidate_folders(store.check_uri(prefix))]
