"""Object store access over fsspec: URIs, ranged reads, atomic writes, listings, fingerprints.

A store URI is a plain path or `file://...` (the embedded default), `s3://bucket/key` (through
s3fs, any S3-compatible endpoint), or `memory://...` (tests). S3 takes the standard AWS
environment: credentials from `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_PROFILE`, the
endpoint from `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`; `with s3_credentials(creds):` uses
explicit ones in one context (a flow run) instead (mergeaudit.store_s3). Reads are ranged requests with s3fs's
read-ahead switched off (by default it fetches 50 MB for an 8-byte read). A read given the
FileInfo its object was listed with (`expect=`) gets those bytes or an `ObjectChangedError`:
S3 reads send `If-Match: <ETag>`, local reads compare the open file's size and mtime.

    from mergeaudit import store
    store.read_range("s3://bucket/ckpt/model.safetensors", 0, 8)
    store.bytes_read()    # what this process has read so far, by object URI

Every failure leaves this module as a `StoreError` (or `TransientStoreError` when a retry may
help, or `ObjectChangedError` when a pinned object was replaced) whose message names the URI
and never the credentials.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import posixpath
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from mergeaudit.errors import StoreError, TransientStoreError
from mergeaudit.store_s3 import ContextThreadPool, S3Credentials, s3_credentials, s3_filesystem  # noqa: F401 - API

SUPPORTED_SCHEMES = ("file", "s3", "memory")
_TRANSIENT_S3_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "Throttling",
    "ThrottlingException",
    "TooManyRequests",
}
_TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EPIPE, errno.EAGAIN}

UPLOAD_PART_BYTES = 64 * 1024 * 1024  # multipart upload part size: bounded memory, few requests
COPY_CHUNK_BYTES = 16 * 1024 * 1024  # store.copy reads this much at a time
MIN_PART_BYTES = 5 * 1024 * 1024  # S3 refuses smaller parts (but the last)
MAX_PARTS = 10_000  # S3 refuses more parts in one upload


@dataclass(frozen=True)
class Location:
    """A URI resolved to a filesystem and the path that filesystem understands."""

    uri: str
    scheme: str
    path: str
    fs: fsspec.AbstractFileSystem

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)


@dataclass(frozen=True)
class FileInfo:
    """Size and a version tag (S3 ETag, or size and mtime on local disks) of one object."""

    uri: str
    size: int
    version: str


def split_scheme(uri: str) -> tuple[str, str]:
    """Return (scheme, rest) for a URI; a plain path has scheme `file`."""
    uri = str(uri)
    if "://" not in uri:
        return "file", uri
    scheme, rest = uri.split("://", 1)
    scheme = scheme.lower()
    if scheme in ("s3a", "s3n"):
        scheme = "s3"
    return scheme, rest


def check_uri(uri: str) -> str:
    """Validate a URI's scheme without touching the store; returns the normalised URI."""
    scheme, rest = split_scheme(uri)
    if scheme not in SUPPORTED_SCHEMES:
        raise StoreError(
            f"unknown store scheme {scheme!r} in {uri!r}; supported: plain paths, "
            + ", ".join(f"{s}://" for s in SUPPORTED_SCHEMES)
        )
    if not rest.strip("/"):
        raise StoreError(f"store URI {uri!r} names no path")
    if scheme == "file":
        return str(Path(rest).expanduser().absolute())
    if scheme == "s3" and len(rest.split("/", 1)[0]) < 3:
        raise StoreError(f"S3 bucket names have at least 3 characters: {uri!r}")
    return f"{scheme}://{rest.rstrip('/')}"


def locate(uri: str) -> Location:
    """Resolve a URI to its filesystem; raises StoreError for an unknown scheme."""
    norm = check_uri(uri)
    scheme, rest = split_scheme(norm)
    if scheme == "file":
        return Location(norm, "file", norm, fsspec.filesystem("file"))
    if scheme == "memory":
        return Location(norm, "memory", "/" + rest.strip("/"), fsspec.filesystem("memory"))
    return Location(norm, "s3", rest.strip("/"), s3_filesystem())


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with forward slashes (also for local paths)."""
    scheme, rest = split_scheme(str(uri))
    joined = posixpath.join(rest.rstrip("/") or "/", *[p.strip("/") for p in parts])
    return joined if scheme == "file" and "://" not in str(uri) else f"{scheme}://{joined}"


def basename(uri: str) -> str:
    return posixpath.basename(split_scheme(uri)[1].rstrip("/"))


def is_transient(exc: BaseException) -> bool:
    """True for failures a retry may fix: network errors, S3 5xx and throttling."""
    if isinstance(exc, TransientStoreError):
        return True
    if isinstance(exc, StoreError):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        err = response.get("Error", {}) or {}
        status = (response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode", 0) or 0
        if err.get("Code") in _TRANSIENT_S3_CODES or int(status) >= 500:
            return True
    name = type(exc).__name__
    if name in (
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ClientConnectorError",
        "ServerDisconnectedError",
        "ClientOSError",
    ):
        return True
    cause = exc.__cause__ or exc.__context__
    return cause is not None and cause is not exc and is_transient(cause)


@contextlib.contextmanager
def translate_errors(uri: str, action: str) -> Iterator[None]:
    """Turn filesystem and botocore errors into StoreError subclasses naming the URI."""
    try:
        yield
    except StoreError:
        raise
    except FileNotFoundError as exc:
        raise StoreError(f"cannot {action} {uri}: not found") from exc
    except PermissionError as exc:
        raise StoreError(f"cannot {action} {uri}: access denied") from exc
    except Exception as exc:  # every storage failure is translated here
        if type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
            raise StoreError(
                f"cannot {action} {uri}: no AWS credentials found; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
            ) from exc
        kind = TransientStoreError if is_transient(exc) else StoreError
        raise kind(f"cannot {action} {uri}: {type(exc).__name__}") from exc


def _refresh(loc: Location, path: str | None = None) -> None:
    # s3fs caches listings; a checkpoint that landed since must be seen.
    if loc.scheme == "s3":
        loc.fs.invalidate_cache(path or loc.path)


def refresh_tree(loc: Location) -> None:
    """Forget s3fs's cached listings of a folder and everything below it (before a glob/find)."""
    if loc.scheme == "s3":
        prefix = loc.path.rstrip("/")
        for key in [k for k in list(loc.fs.dircache) if k == prefix or k.startswith(prefix + "/")]:
            loc.fs.dircache.pop(key, None)
        loc.fs.invalidate_cache(loc.path)


def exists(uri: str) -> bool:
    loc = locate(uri)
    with translate_errors(uri, "check"):
        _refresh(loc)
        return bool(loc.fs.exists(loc.path))


def info(uri: str) -> FileInfo:
    """Size and version tag of one object."""
    loc = locate(uri)
    with translate_errors(uri, "stat"):
        _refresh(loc)
        raw = loc.fs.info(loc.path)
    return _file_info(loc.uri, raw)


def _file_info(uri: str, raw: dict) -> FileInfo:
    size = int(raw.get("size") or 0)
    etag = raw.get("ETag") or raw.get("etag")
    if etag:
        version = "etag:" + str(etag).strip('"')
    else:
        stamp = raw.get("mtime") or raw.get("LastModified") or raw.get("created") or ""
        if hasattr(stamp, "timestamp"):
            stamp = stamp.timestamp()
        version = f"size:{size}:mtime:{stamp}"
    return FileInfo(uri=uri, size=size, version=version)


def list_files(uri: str) -> dict[str, FileInfo]:
    """Direct children (files only) of a folder URI, by name."""
    loc = locate(uri)
    with translate_errors(uri, "list"):
        _refresh(loc)
        entries = loc.fs.ls(loc.path, detail=True)
    out = {}
    for raw in entries:
        if raw.get("type") != "file":
            continue
        name = posixpath.basename(str(raw["name"]).rstrip("/"))
        out[name] = _file_info(join(loc.uri, name), raw)
    return out


def list_dirs(uri: str) -> list[str]:
    """URIs of the direct sub-folders of a folder URI (empty when it does not exist)."""
    loc = locate(uri)
    with translate_errors(uri, "list"):
        _refresh(loc)
        if not loc.fs.exists(loc.path):
            return []
        entries = loc.fs.ls(loc.path, detail=True)
    names = [posixpath.basename(str(e["name"]).rstrip("/")) for e in entries if e.get("type") == "directory"]
    return [join(loc.uri, n) for n in sorted(names)]


def write_bytes(uri: str, data: bytes) -> None:
    """Write one object so that readers see either nothing or all of it.

    Local files are written under a hidden temporary name and renamed into place; an object
    store PUT is atomic by itself.
    """
    loc = locate(uri)
    with translate_errors(uri, "write"):
        if loc.is_local:
            parent = os.path.dirname(loc.path)
            os.makedirs(parent, exist_ok=True)
            tmp = os.path.join(parent, f".{os.path.basename(loc.path)}.tmp-{uuid.uuid4().hex[:12]}")
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, loc.path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            loc.fs.pipe_file(loc.path, data)


@contextlib.contextmanager
def open_write(uri: str, part_bytes: int = UPLOAD_PART_BYTES) -> Iterator:
    """A binary file to stream one object into; readers see it only once the block exits cleanly.

    Local: a hidden temporary file renamed into place. Object stores: a streaming (multipart)
    upload of `part_bytes` parts (at least 5 MiB, S3's minimum; memory holds a few parts) that
    completes on close and is discarded on error, so a failure leaves no object.
    """
    loc = locate(uri)
    with translate_errors(uri, "write"):
        if loc.is_local:
            parent = os.path.dirname(loc.path)
            os.makedirs(parent, exist_ok=True)
            tmp = os.path.join(parent, f".{os.path.basename(loc.path)}.tmp-{uuid.uuid4().hex[:12]}")
            try:
                with open(tmp, "wb") as fh:
                    yield fh
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, loc.path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            fh = loc.fs.open(loc.path, "wb", block_size=max(part_bytes, MIN_PART_BYTES))
            try:
                yield fh
            except BaseException:
                with contextlib.suppress(Exception):
                    fh.discard()
                fh.closed = True  # so garbage collection cannot complete the upload
                raise
            fh.close()


def copy(src_uri: str, dst_uri: str) -> None:
    """Copy one object between any two stores, streamed through this process.

    The source is read in chunks of COPY_CHUNK_BYTES into one reused buffer and S3 uploads go in
    parts of that size, so memory holds a few chunks, never the object (64 MiB copied: 16 MiB
    peak between local files, 65 MiB to S3, 48 MiB from S3). Every chunk is pinned to the
    version the source had when the copy began: a source replaced meanwhile is an
    ObjectChangedError, never a file mixing two versions. The destination appears only once
    complete (open_write: a temporary name renamed into place, or a multipart upload), and a
    failure part-way leaves nothing there.
    """
    from mergeaudit import store_reads

    src = info(src_uri)
    chunk = max(1, min(COPY_CHUNK_BYTES, src.size))
    view = memoryview(bytearray(chunk))
    # parts as small as the chunk while S3's 10,000 parts still hold the object
    part = max(COPY_CHUNK_BYTES, -(-src.size // MAX_PARTS))
    with open_write(dst_uri, part_bytes=part) as out:
        for start in range(0, src.size, chunk):
            n = min(chunk, src.size - start)
            store_reads.read_into(src_uri, start, view[:n], expect=src)
            out.write(view[:n])


def remove(uri: str, recursive: bool = False) -> None:
    loc = locate(uri)
    with translate_errors(uri, "remove"):
        _refresh(loc)
        if loc.fs.exists(loc.path):
            loc.fs.rm(loc.path, recursive=recursive)


def fingerprint(infos: list[FileInfo]) -> str:
    """A stable digest of a set of files' names, sizes and version tags."""
    h = hashlib.sha256()
    for fi in sorted(infos, key=lambda f: basename(f.uri)):
        h.update(f"{basename(fi.uri)}\0{fi.size}\0{fi.version}\n".encode())
    return h.hexdigest()[:32]


_READS = (
    "Expect",
    "bytes_read",
    "bytes_read_since",
    "check_local_version",
    "count_read",
    "process_tag",
    "read_bytes",
    "read_into",
    "read_range",
)


def __getattr__(name: str):
    """`read_bytes`, `read_range`, `read_into` (version-pinned) and the tally of bytes read
    (`bytes_read`, `bytes_read_since`) live in mergeaudit.store_reads, which imports this
    module; they are part of this module's API."""
    if name in _READS:
        from mergeaudit import store_reads

        return getattr(store_reads, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
