"""Bytes read per checkpoint: what a run fetched from the stores its inputs live in.

`store.bytes_read()` tallies, in one process, the bytes read per object URI (ranged and whole
reads, cache fills, local reads); a checkpoint's count is the sum over the files directly in
its folder, so reads of a read-through cache's local copy are not its source's and do not
count. A run adds what its evaluations read in other processes (child flow runs on GPU
workers), which they report by checkpoint URI: a child run writes its counts to
`report_uri(RESULTS, its flow run id)` and the parent reads them back. With the cache, an
audit reads each input about once (1.00x its size) per worker; without it, about once per
candidate that uses it.

    before = store.bytes_read()
    ...                                              # open, stream, evaluate
    totals = input_totals({"base": base_uri}, store.bytes_read_since(before), [])
    summary_lines(totals, {"base": 180_344})  # ["bytes read: base 176.1 KiB (1.00x its size, 176.1 KiB)"]
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Iterable, Mapping

from mergeaudit import store
from mergeaudit.errors import StoreError

log = logging.getLogger(__name__)


def by_checkpoint(counts: Mapping[str, int], uris: Iterable[str]) -> dict[str, int]:
    """Bytes read per checkpoint folder URI, from counts by object URI (`store.bytes_read()`
    or a difference of two of its snapshots); every URI asked for appears, 0 when unread."""
    out = {uri: 0 for uri in uris}
    for obj, n in counts.items():
        folder = posixpath.dirname(obj)
        if folder in out:
            out[folder] += n
    return out


def input_totals(
    inputs: Mapping[str, str], here: Mapping[str, int], elsewhere: Iterable[Mapping[str, int]] = ()
) -> dict[str, int]:
    """Bytes read per input name (inputs: name -> checkpoint URI): this process's counts by
    object URI plus the counts by checkpoint URI that other processes reported."""
    per_uri = by_checkpoint(here, inputs.values())
    for counts in elsewhere:
        for uri, n in counts.items():
            if uri in per_uri:
                per_uri[uri] += n
    return {name: per_uri[uri] for name, uri in inputs.items()}


def human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def summary_lines(bytes_read: Mapping[str, int], sizes: Mapping[str, int]) -> list[str]:
    """One line per input: the bytes this run read of it, and that as a multiple of its size
    (all its files: what one full read fetches)."""
    out = []
    for name, n in bytes_read.items():
        size = sizes.get(name)
        ratio = f" ({n / size:.2f}x its size, {human_bytes(size)})" if size else ""
        out.append(f"bytes read: {name} {human_bytes(n)}{ratio}")
    return out


def report_uri(results_uri: str, run: str) -> str:
    """Where an evaluation run in another process reports what it read."""
    return store.join(results_uri, "evaluations", "reads", f"{run}.json")


def save_report(uri: str, bytes_read: Mapping[str, int], read_by: str | None) -> None:
    """Write what an evaluation read; a failure is logged, never the evaluation's (the parent
    then reports the bytes its other evaluations read, and says which report is missing)."""
    try:
        store.write_bytes(uri, json.dumps({"bytes_read": dict(bytes_read), "read_by": read_by}).encode())
    except StoreError as exc:
        log.warning("cannot write the bytes-read report %s: %s", uri, exc)


def load_report(uri: str) -> dict:
    """{"bytes_read": {checkpoint URI: bytes}, "read_by": process} as saved, or {} (with a
    warning) when none was."""
    if not store.exists(uri):
        log.warning("no bytes-read report at %s: the run's bytes read leave that evaluation out", uri)
        return {}
    doc = json.loads(store.read_bytes(uri))
    return {"bytes_read": {str(k): int(v) for k, v in doc.get("bytes_read", {}).items()}, "read_by": doc.get("read_by")}
