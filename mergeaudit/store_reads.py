"""Reads from any store, pinned to the version a listing saw: part of `mergeaudit.store`.

    store.read_range(uri, start, end, expect=file_info)   # bytes of that version, or an error

A fingerprint (names, sizes, version tags of a checkpoint's files) describes what was listed,
so every read that feeds a fingerprinted result must read that version. With `expect` (the
object's FileInfo or its version tag): S3 GETs carry `If-Match: "<ETag>"`, which the store
refuses with 412 once the object is replaced (ListObjectsV2 gives no VersionId, and If-Match
works on versioned and unversioned buckets alike); local reads compare the open file's size and
mtime with the tag after reading (an in-place rewrite of the same size within one tick of the
file-system clock, a few ms, is invisible to stat); other stores compare info() after the read.
A change is an ObjectChangedError (a StoreError, not transient: retrying the same pinned read
cannot succeed). Import these from `mergeaudit.store`.

Every read is counted, per object URI, in a process-wide tally of the bytes fetched from the
object's store (ranged and whole reads, cache fills, pread and mapped local reads alike):
`bytes_read()` is a snapshot, `bytes_read_since(snapshot)` the bytes read after it.

    before = store.bytes_read()
    ...
    store.bytes_read_since(before)   # {"s3://bkt/base/model.safetensors": 180344, ...}
"""

from __future__ import annotations

import collections
import os
import threading
import uuid
from typing import Union

import fsspec.asyn

from mergeaudit.errors import ObjectChangedError, StoreError
from mergeaudit.store import FileInfo, Location, _file_info, locate, translate_errors

Expect = Union[FileInfo, str, None]

_read_lock = threading.Lock()
_read: collections.Counter[str] = collections.Counter()
_BOOT = uuid.uuid4().hex[:12]


def count_read(uri: str, nbytes: int) -> None:
    """Add nbytes read from uri to this process's tally (the readers here call it; so does a
    reader that maps a local file)."""
    _count(locate(uri).uri, nbytes)


def _count(norm_uri: str, nbytes: int) -> None:
    if nbytes > 0:
        with _read_lock:
            _read[norm_uri] += nbytes


def bytes_read() -> dict[str, int]:
    """A snapshot of the bytes this process has read, by object URI."""
    with _read_lock:
        return dict(_read)


def bytes_read_since(before: dict[str, int]) -> dict[str, int]:
    """The bytes read, by object URI, since the snapshot `before` (only URIs read since)."""
    now = bytes_read()
    return {uri: n - before.get(uri, 0) for uri, n in now.items() if n > before.get(uri, 0)}


def process_tag() -> str:
    """Names this process (a fork gets a new one): whose tally a count of bytes read is in."""
    return f"{_BOOT}:{os.getpid()}"


def read_bytes(uri: str, expect: Expect = None) -> bytes:
    """A whole object; with `expect`, only the version that was listed (see read_range)."""
    loc = locate(uri)
    version = _version_of(expect)
    with translate_errors(uri, "read"):
        if loc.is_local and version is not None:
            with open(loc.path, "rb") as fh:
                data = fh.read()
                _count(loc.uri, len(data))
                check_local_version(uri, os.fstat(fh.fileno()), version)
            return data
        return _get(loc, None, None, version)


def read_range(uri: str, start: int, end: int, expect: Expect = None) -> bytes:
    """Bytes [start, end) of one object, as one ranged request; short reads are errors.

    `expect` (the object's FileInfo, or its version tag) pins the read to the version that was
    listed: on S3 the request carries `If-Match: <ETag>` and the store refuses it when the
    object has been replaced; locally the open file's size and mtime are compared after the
    read. Either way a change is an ObjectChangedError, never a silent mix of versions.
    """
    if end <= start:
        return b""
    loc = locate(uri)
    version = _version_of(expect)
    with translate_errors(uri, "read"):
        if loc.is_local and version is not None:
            buf = bytearray(end - start)
            read_into(uri, start, buf, expect=version)
            return bytes(buf)
        data = _get(loc, start, end, version)
    if len(data) != end - start:
        raise StoreError(f"short read from {uri}: wanted bytes [{start}, {end}), got {len(data)}")
    return data


def read_into(uri: str, start: int, buf: bytearray | memoryview, expect: Expect = None) -> None:
    """Fill buf with bytes [start, start + len(buf)) of one object, as one ranged request.

    Local files are read with pread straight into buf (no intermediate copy, the GIL released);
    other stores fetch the range and copy it in. Short reads are errors; `expect` as in
    read_range.
    """
    view = memoryview(buf).cast("B")
    want = view.nbytes
    if want == 0:
        return
    loc = locate(uri)
    version = _version_of(expect)
    with translate_errors(uri, "read"):
        if loc.is_local:
            fd = os.open(loc.path, os.O_RDONLY)
            try:
                got = 0
                while got < want:
                    n = os.preadv(fd, [view[got:]], start + got)
                    if n == 0:
                        break
                    got += n
                _count(loc.uri, got)
                if version is not None:  # after the read: a change during it shows too
                    check_local_version(uri, os.fstat(fd), version)
            finally:
                os.close(fd)
        else:
            data = _get(loc, start, start + want, version)  # counted there
            got = len(data)
            view[:got] = data
            del data
    if got != want:
        raise StoreError(f"short read from {uri}: wanted bytes [{start}, {start + want}), got {got}")


def _version_of(expect: Expect) -> str | None:
    return expect.version if isinstance(expect, FileInfo) else expect


def check_local_version(uri: str, st: os.stat_result, version: str) -> None:
    """ObjectChangedError unless an open local file (its fstat) still has the listed version tag."""
    # the same tag list_files builds from fsspec's stat (size, float mtime: ~0.2 us resolution)
    _check_same(uri, version, _file_info(uri, {"size": st.st_size, "mtime": st.st_mtime, "created": st.st_ctime}))


def _check_same(uri: str, version: str, now: FileInfo) -> None:
    if now.version != version:
        raise ObjectChangedError(f"{uri} changed since it was listed (was {version}, now {now.version})")


def _get(loc: Location, start: int | None, end: int | None, version: str | None) -> bytes:
    """One GET (ranged when start is given); pinned to `version` when it is an S3 ETag."""
    if loc.scheme == "s3" and version is not None and version.startswith("etag:"):
        # s3fs's cat_file cannot send If-Match; its retrying, error-translating _call_s3 can
        bucket, key, _ = loc.fs.split_path(loc.path)
        kw = {"IfMatch": '"' + version.removeprefix("etag:") + '"'}
        if start is not None:
            kw["Range"] = f"bytes={start}-{end - 1}"

        async def get() -> bytes:
            resp = await loc.fs._call_s3("get_object", Bucket=bucket, Key=key, **kw)
            try:
                return await resp["Body"].read()
            finally:
                resp["Body"].close()

        try:
            data = fsspec.asyn.sync(loc.fs.loop, get)
            _count(loc.uri, len(data))
            return data
        except Exception as exc:  # only a failed precondition is ours to name
            if _precondition_failed(exc):
                raise ObjectChangedError(
                    f"{loc.uri} changed since it was listed: its ETag is no longer {version[5:]} "
                    "(the GET's If-Match failed)"
                ) from exc
            raise
    data = loc.fs.cat_file(loc.path, start=start, end=end)
    _count(loc.uri, len(data))
    if version is not None and loc.scheme != "s3" and not loc.is_local:
        _check_same(loc.uri, version, _file_info(loc.uri, loc.fs.info(loc.path)))  # memory://: after the read
    return data


def _precondition_failed(exc: BaseException | None) -> bool:
    seen = 0
    while exc is not None and seen < 8:
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            code = (response.get("Error", {}) or {}).get("Code")
            status = (response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode")
            if code == "PreconditionFailed" or status == 412:
                return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False
