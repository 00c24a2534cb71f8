"""A small receiver for S3/MinIO bucket notifications: each notification that completes a
checkpoint under a watched prefix becomes the event `mergeaudit.checkpoint.landed`, exactly as
the polling watcher (`flows/watch.py`) would emit it, with the same event id.

    mergeaudit notify-receiver --prefix s3://ckpts/rl-math --port 8088 [--state-uri URI] [--marker _COMPLETE]

Point a MinIO webhook target (`mc admin config set ALIAS notify_webhook:mergeaudit
endpoint=http://HOST:8088/ auth_token=TOKEN`, then `mc event add ALIAS/ckpts
arn:minio:sqs::mergeaudit:webhook --event put`) or an SNS HTTP subscription at it. With
MERGEAUDIT_NOTIFY_TOKEN set, requests must carry `Authorization: Bearer TOKEN`. Announced
checkpoints are recorded in the watcher's state when `--state-uri` is given, so the poller
does not announce them again.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from mergeaudit import notify, store, watch
from mergeaudit.errors import MergeAuditError

log = logging.getLogger("mergeaudit.notify")
TOKEN_ENV = "MERGEAUDIT_NOTIFY_TOKEN"


def make_server(host: str, port: int, prefixes: list[str], state_uri: str | None = None, marker: str | None = None,
                kind: str = "rlvr", announce: Callable[[watch.Landed], None] | None = None) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving) that announces the checkpoints notifications complete."""
    if announce is None:
        from mergeaudit.flows.watch import announce
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
            if length > notify.MAX_BODY_BYTES:
                self._reply(413, {"error": "notification too large"})
                return
            body = self.rfile.read(length)
            try:
                with lock:
                    state = watch.load_state(state_uri) if state_uri else {}
                    landed = notify.landed_checkpoints(body, prefixes, state, marker=marker, kind=kind)
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
    return ThreadingHTTPServer((host, port), Handler)


def serve(host: str, port: int, prefixes: list[str], state_uri: str | None = None, marker: str | None = None,
          kind: str = "rlvr") -> None:
    server = make_server(host, port, prefixes, state_uri, marker, kind)
    log.info("listening on http://%s:%d/ for notifications under %s", host, server.server_address[1],
             ", ".join(prefixes))
    try:
        server.serve_forever()
    finally:
        server.server_close()
