"""Bucket notifications -> checkpoint announcements, the push twin of the polling watcher.

S3 and MinIO can POST an event notification for every object written (AWS through SNS/SQS/
EventBridge forwarding, MinIO directly to a webhook target). `checkpoints_in` turns one
notification body into the checkpoint folders it may have completed (the parent folder of a
`config.json`, weights file, index or completion marker under a watched prefix), and
`landed_checkpoints` checks each of them (headers only) and returns the complete ones that the
watcher's state has not announced, as the same `Landed` records the watcher emits, with the
same event ids. The HTTP server and the event emission live in `flows/notify.py`.

    for landed in landed_checkpoints(body, prefixes=["s3://ckpts/rl"], state=load_state(uri)):
        announce(landed)
"""

from __future__ import annotations

import json
import posixpath
import urllib.parse

from mergeaudit import store
from mergeaudit.checkpoint import check_complete
from mergeaudit.checkpoint.reader import CONFIG_FILE, INDEX_FILE
from mergeaudit.errors import ConfigError
from mergeaudit.watch import Landed, checkpoint_name

MAX_BODY_BYTES = 4 << 20


def _records(body: bytes) -> list[dict]:
    if len(body) > MAX_BODY_BYTES:
        raise ConfigError(f"notification of {len(body)} bytes is over the limit of {MAX_BODY_BYTES}")
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"notification is not JSON: {exc}") from exc
    if isinstance(doc, dict) and isinstance(doc.get("Message"), str):  # SNS envelope
        return _records(doc["Message"].encode())
    if not isinstance(doc, dict) or not isinstance(doc.get("Records", []), list):
        raise ConfigError("notification has no `Records` list (S3/MinIO event format)")
    return doc.get("Records", [])


def _triggers(key: str, marker: str | None) -> bool:
    name = posixpath.basename(key)
    return name in (CONFIG_FILE, INDEX_FILE) or name.endswith(".safetensors") or (marker is not None and name == marker)


def checkpoints_in(body: bytes, prefixes: list[str], marker: str | None = None) -> list[tuple[str, str]]:
    """(prefix, checkpoint URI) for every created object under a watched prefix that may
    complete a checkpoint; the s3:// URIs are bucket/key with the key URL-decoded."""
    roots = [store.check_uri(p) for p in prefixes]
    found: dict[str, str] = {}
    for record in _records(body):
        event = str(record.get("eventName", ""))
        if "ObjectCreated" not in event:
            continue
        s3 = record.get("s3") or {}
        bucket = (s3.get("bucket") or {}).get("name")
        key = urllib.parse.unquote_plus(str((s3.get("object") or {}).get("key", "")))
        if not bucket or not key or not _triggers(key, marker):
            continue
        folder = f"s3://{bucket}/{posixpath.dirname(key)}".rstrip("/")
        if any(part.startswith(".") for part in posixpath.dirname(key).split("/")):
            continue  # a staging area of an unfinished publish
        for root in roots:
            if folder == root or folder.startswith(root + "/"):
                found.setdefault(folder, root)
                break
    return [(prefix, uri) for uri, prefix in found.items()]


def landed_checkpoints(body: bytes, prefixes: list[str], state: dict[str, str], marker: str | None = None,
                       kind: str = "rlvr") -> list[Landed]:
    """The complete, not yet announced checkpoints a notification points at."""
    out = []
    for prefix, uri in checkpoints_in(body, prefixes, marker):
        status = check_complete(uri, marker)
        if status.complete and state.get(uri) != status.fingerprint:
            out.append(Landed(uri, checkpoint_name(prefix, uri), status.fingerprint, prefix, kind))
    return out
