"""Bucket notifications -> checkpoint announcements, the push twin of the polling watcher.

S3 and MinIO can POST an event notification for every object written (AWS through SNS/SQS/
EventBridge forwarding, MinIO directly to a webhook target). `checkpoints_in` turns one
notification body into the checkpoint folders it may have completed (the parent folder of a
`config.json`, weights file, index or completion marker under a watched prefix), and
`landed_checkpoints` checks each of them (headers only) and returns the complete ones that the
watcher's state has not announced, as the same `Landed` records the watcher emits, with the
same event ids. `make_server` is the HTTP receiver that does this for every POST and hands each
landed checkpoint to the `announce` function it is given; announcing is orchestration's job
(`mergeaudit notify-receiver` passes `mergeaudit.flows.watch.announce`, which emits the Prefect
event `mergeaudit.checkpoint.landed`), so nothing here imports Prefect.

    mergeaudit notify-receiver --prefix s3://ckpts/rl-math --port 8088 [--state-uri URI] [--marker _COMPLETE]

Point a MinIO webhook target (`mc admin config set ALIAS notify_webhook:mergeaudit
endpoint=http://HOST:8088/ auth_token=TOKEN`, then `mc event add ALIAS/ckpts
arn:minio:sqs::mergeaudit:webhook --event put`) or an SNS HTTP subscription at it. With
MERGEAUDIT_NOTIFY_TOKEN set, requests must carry `Authorization: Bearer TOKEN`. Announced
checkpoints are recorded in the watcher's state when a state URI is given, so the poller does
not announce them again.

    for landed in landed_checkpoints(body, prefixes=["s3://ckpts/rl"], state=load_state(uri)):
        announce(landed)
    serve("0.0.0.0", 8088, ["s3://ckpts/rl"], announce, state_uri=uri)
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import posixpath
import threading
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from mergeaudit import store, watch
from mergeaudit.checkpoint import check_complete
from mergeaudit.checkpoint.reader import CONFIG_FILE, INDEX_FILE
from mergeaudit.errors import ConfigError, MergeAuditError
from mergeaudit.watch import Landed, checkpoint_name

MAX_BODY_BYTES = 4 << 20
TOKEN_ENV = "MERGEAUDIT_NOTIFY_TOKEN"
log = logging.getLogger("mergeaudit.notify")


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


def landed_checkpoints(
    body: bytes,
    prefixes: list[str],
    state: dict[str, str],
    marker: str | None = None,
    kind: str = "rlvr",
    rules: list[str] | None = None,
) -> list[Landed]:
    """The complete, not yet announced checkpoints a notification points at, each with its kind
    (`watch.kind_of`: the first matching rule, else `kind`)."""
    parsed = watch.kind_rules(rules)
    out = []
    for prefix, uri in checkpoints_in(body, prefixes, marker):
        status = check_complete(uri, marker)
        if status.complete and state.get(uri) != status.fingerprint:
            out.append(
                Landed(
                    uri,
                    checkpoint_name(prefix, uri),
                    status.fingerprint,
                    prefix,
                    watch.kind_of(prefix, uri, parsed, kind),
                )
            )
    return out


def make_server(
    host: str,
    port: int,
    prefixes: list[str],
    announce: Callable[[Landed], None],
    *,
    state_uri: str | None = None,
    marker: str | None = None,
    kind: str = "rlvr",
    rules: list[str] | None = None,
) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving) that passes every checkpoint a notification completes to
    `announce`, once (remembered in the watcher's state at `state_uri` when given)."""
    token = os.environ.get(TOKEN_ENV)
    lock = threading.Lock()  # one notification at a time: the state is read-modified-written

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, status: int, doc) -> None:
            data = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # health check
            self._reply(200, {"status": "ok"})

        def do_POST(self) -> None:
            given = self.headers.get("Authorization", "")
            if token and not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                self._reply(401, {"error": "unauthorized"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                self._reply(413, {"error": "notification too large"})
                return
            body = self.rfile.read(length)
            try:
                with lock:
                    state = watch.load_state(state_uri) if state_uri else {}
                    landed = landed_checkpoints(body, prefixes, state, marker=marker, kind=kind, rules=rules)
                    for item in landed:
                        announce(item)
                        if state_uri:
                            watch.remember(state_uri, item)
                        log.info("announced %s (%s)", item.uri, item.fingerprint)
            except MergeAuditError as exc:
                self._reply(400, {"error": str(exc)})
                return
            self._reply(200, {"announced": [item.payload() for item in landed]})

        def log_message(self, fmt: str, *args) -> None:
            log.debug(fmt, *args)

    for prefix in prefixes:
        store.check_uri(prefix)
    watch.kind_rules(rules)  # a bad rule fails at start, not at the first notification
    return ThreadingHTTPServer((host, port), Handler)


def serve(
    host: str,
    port: int,
    prefixes: list[str],
    announce: Callable[[Landed], None],
    *,
    state_uri: str | None = None,
    marker: str | None = None,
    kind: str = "rlvr",
    rules: list[str] | None = None,
) -> None:
    """Receive notifications until interrupted (KeyboardInterrupt); see `make_server`."""
    server = make_server(host, port, prefixes, announce, state_uri=state_uri, marker=marker, kind=kind, rules=rules)
    log.info(
        "listening on http://%s:%d/ for notifications under %s", host, server.server_address[1], ", ".join(prefixes)
    )
    try:
        server.serve_forever()
    finally:
        server.server_close()
