"""S3 clients for the store: explicit credentials scoped to a context, and a bounded client cache.

Part of `mergeaudit.store` (import these names from there). Without explicit credentials s3fs
takes the AWS environment. `with store.s3_credentials(creds):` uses explicit ones (from a
Prefect block, say) inside the block, in this context only: a `contextvars.ContextVar`, so two
flow runs in one process each read with their own, and what starts from a copy of the context
(Prefect task runs, `ContextThreadPool` jobs) reads with the same. Clients are cached by the
credentials' values, the endpoint and the AWS environment, at most `_FS_CACHE_SIZE` of them.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import fsspec

_fs_cache: collections.OrderedDict[tuple, fsspec.AbstractFileSystem] = collections.OrderedDict()
_fs_lock = threading.Lock()
_FS_CACHE_SIZE = 16
# what the AWS environment's default client is made from
_AWS_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
)


@dataclass(frozen=True)
class S3Credentials:
    """Explicit S3 credentials (from a Prefect block, say); secrets never appear in repr()."""

    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    profile: str | None = None
    region: str | None = None
    endpoint_url: str | None = None


_s3_credentials: contextvars.ContextVar[S3Credentials | None] = contextvars.ContextVar(
    "mergeaudit_s3_credentials", default=None
)


@contextlib.contextmanager
def s3_credentials(creds: S3Credentials | None) -> Iterator[None]:
    """Use these credentials for s3:// inside the block instead of the AWS environment (None: the
    environment). They hold in this context only: this thread or asyncio task, and what starts
    from a copy of it (Prefect task runs, `ContextThreadPool` jobs), so two flow runs sharing a
    process each read with their own.

        with store.s3_credentials(creds):
            store.read_bytes("s3://bucket/key")
    """
    token = _s3_credentials.set(creds)
    try:
        yield
    finally:
        _s3_credentials.reset(token)


class ContextThreadPool(ThreadPoolExecutor):
    """A thread pool whose jobs run in a copy of the submitter's context, so they read with the
    same `s3_credentials` (a plain pool's threads would use the AWS environment)."""

    def submit(self, fn, /, *args, **kwargs):
        return super().submit(contextvars.copy_context().run, fn, *args, **kwargs)


def s3_filesystem() -> fsspec.AbstractFileSystem:
    """The s3fs filesystem for this context's credentials (`s3_credentials`, else the AWS
    environment), made once per distinct credentials, endpoint and environment."""
    creds = _s3_credentials.get()
    endpoint = (
        (creds.endpoint_url if creds and creds.endpoint_url else None)
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    # Keyed by everything that makes the client (the credentials' values, not their id(), which a
    # later object may reuse), so a changed environment or endpoint gets a fresh one.
    key = ("s3", endpoint, creds, tuple(os.environ.get(v) for v in _AWS_ENV))
    with _fs_lock:
        fs = _fs_cache.get(key)
        if fs is not None:
            _fs_cache.move_to_end(key)
        else:
            import s3fs

            kwargs: dict = {"default_cache_type": "none", "skip_instance_cache": True}
            if endpoint:
                kwargs["endpoint_url"] = endpoint
            if creds is not None:
                kwargs.update(
                    key=creds.access_key_id,
                    secret=creds.secret_access_key,
                    token=creds.session_token,
                    profile=creds.profile,
                )
                if creds.region:
                    kwargs["client_kwargs"] = {"region_name": creds.region}
            fs = s3fs.S3FileSystem(**kwargs)
            _fs_cache[key] = fs
            while len(_fs_cache) > _FS_CACHE_SIZE:  # rotated credentials must not pile up clients
                _fs_cache.popitem(last=False)
    return fs
