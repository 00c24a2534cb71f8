"""A read-through cache of whole checkpoints on local disk, keyed by fingerprint, size-limited.

Nightly runs audit mostly unchanged checkpoints; with a cache, the first run streams each
checkpoint's files to `CACHE_DIR/<fingerprint>/` (ranged reads of COPY_CHUNK, bounded memory,
each pinned to the listed version, so a file replaced mid-download is a CheckpointChangedError
and nothing is cached) and later runs read the local copy. A changed file changes the
fingerprint, so stale bytes are never served.

The cache only ever touches what it created: every entry holds a marker file
(`.mergeaudit-cache-entry`, JSON with the fingerprint and source URI) written before the entry
is renamed into place, and `entries()`, eviction and lookups ignore folders without it (and
anything else in CACHE_DIR). A reader holds a lease on its entry for as long as the returned
`CacheLease` lives (`Checkpoint.open` keeps it on the checkpoint): a shared `flock` on the
marker. Eviction, least-recently-used first, takes a non-blocking exclusive lock and skips
entries it cannot get, so an entry in use is never evicted, by this process or another one.
When the checkpoint does not fit in `max_bytes` beside the entries in use, the cache logs a
warning naming the sizes and the checkpoint is read in place, from its source; so it is when
the cache folder cannot be created or filled (a read-only home, a full disk). Local checkpoints
are always read in place, never copied.

Audits use a cache by default (`storage.cache: auto`), in `default_cache_dir()`:
`$MERGEAUDIT_CACHE_DIR`, else `$XDG_CACHE_HOME/mergeaudit/checkpoints`, else
`~/.cache/mergeaudit/checkpoints`. `local_copy(files)` leases the entry of exactly these files
(by fingerprint) when there is one, in a cache folder this process has used or the default one,
so small files read apart from the tensors (the tokenizer) come from the cache too.

    cache = CheckpointCache("/var/cache/mergeaudit", max_bytes=200 << 30)
    ck = Checkpoint.open("s3://bkt/step-400", cache=cache)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
import uuid
import weakref
from pathlib import Path

from mergeaudit import store
from mergeaudit.errors import CheckpointChangedError, ObjectChangedError

COPY_CHUNK = 64 * 1024 * 1024
MARKER = ".mergeaudit-cache-entry"
CACHE_DIR_ENV = "MERGEAUDIT_CACHE_DIR"
log = logging.getLogger(__name__)
# fingerprint -> a lease this process holds on that entry (gone when the lease is collected)
_held: weakref.WeakValueDictionary[str, CacheLease] = weakref.WeakValueDictionary()
_roots: set[Path] = set()  # the cache folders this process has used


def default_cache_dir() -> Path:
    """$MERGEAUDIT_CACHE_DIR, else $XDG_CACHE_HOME/mergeaudit/checkpoints, else
    ~/.cache/mergeaudit/checkpoints."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mergeaudit" / "checkpoints"


def local_copy(files: dict[str, store.FileInfo]) -> CacheLease | None:
    """A lease on the cache entry of exactly these files (their fingerprint): one this process
    holds, or one found in a cache folder it has used or the default folder; None when there is
    none. Keep the lease while reading from its `path`."""
    key = store.fingerprint(list(files.values()))
    lease = _held.get(key)
    if lease is not None and lease._fd is not None:
        return lease
    for root in [*_roots, default_cache_dir()]:
        lease = _lease(root / key, key)
        if lease is not None:
            return lease
    return None


class CacheLease:
    """A cached checkpoint's local folder, kept from eviction while this object lives (or until
    `release()`)."""

    def __init__(self, path: Path, fd: int):
        self.path = str(path)
        self._fd: int | None = fd
        _held[Path(path).name] = self  # entries are named by fingerprint

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __del__(self) -> None:
        self.release()

    def __getstate__(self) -> dict:
        # A copy or an unpickled lease holds nothing (and never closes the original's fd).
        return {"path": self.path, "_fd": None}

    def __fspath__(self) -> str:
        return self.path

    def __repr__(self) -> str:
        return f"CacheLease({self.path!r}, held={self._fd is not None})"


def _lock(marker: Path, mode: int) -> int | None:
    """An fd holding `mode` on marker, or None when the lock is not free (non-blocking modes)
    or the marker is gone."""
    try:
        fd = os.open(marker, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, mode)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _same_file(fd: int, path: Path) -> bool:
    """True when path still names the file fd has open (the entry was not evicted meanwhile)."""
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _lease(entry: Path, key: str) -> CacheLease | None:
    """A lease on a complete entry of key, or None."""
    marker = entry / MARKER
    if entry.is_symlink() or not entry.is_dir():
        return None
    fd = _lock(marker, fcntl.LOCK_SH)
    if fd is None:
        return None
    if not _same_file(fd, marker) or _marker_key(marker) != key:
        os.close(fd)
        return None
    return CacheLease(entry, fd)


def _entry_bytes(entry: Path) -> int:
    return sum(f.stat().st_size for f in entry.iterdir() if f.is_file() and f.name != MARKER)


class CheckpointCache:
    def __init__(self, root: str | os.PathLike, max_bytes: int):
        self.root = Path(root)
        self.max_bytes = int(max_bytes)

    def fetch(self, uri: str, files: dict[str, store.FileInfo]) -> CacheLease | None:
        """A lease on the local folder holding the checkpoint's files (downloading on a miss),
        or None when the checkpoint is local already or does not fit the cache (read in place)."""
        if store.locate(uri).is_local:
            return None
        size = sum(f.size for f in files.values())
        if size > self.max_bytes:
            log.warning(
                "checkpoint %s (%d bytes) is larger than the cache %s (max_bytes %d): reading it in place",
                uri,
                size,
                self.root,
                self.max_bytes,
            )
            return None
        try:
            self.root.mkdir(parents=True, exist_ok=True)  # only once something is to be cached
        except OSError as exc:
            log.warning("cannot create the checkpoint cache %s (%s): reading %s in place", self.root, exc, uri)
            return None
        _roots.add(self.root)
        key = store.fingerprint(list(files.values()))
        entry = self.root / key
        lease = _lease(entry, key)
        if lease is not None:
            os.utime(entry)  # recently used
            return lease
        if entry.exists() or entry.is_symlink():
            log.warning("%s exists but is not a complete entry of this cache: reading %s in place", entry, uri)
            return None
        if not self._make_room(size, uri):
            return None
        return self._download(uri, files, key, entry)

    def _download(self, uri: str, files: dict[str, store.FileInfo], key: str, entry: Path) -> CacheLease | None:
        staging = self.root / f".partial-{uuid.uuid4().hex[:12]}"
        try:
            staging.mkdir()
            for name, fi in files.items():
                with open(staging / name, "wb") as out:
                    for start in range(0, fi.size, COPY_CHUNK):
                        out.write(store.read_range(fi.uri, start, min(fi.size, start + COPY_CHUNK), expect=fi))
            marker = staging / MARKER
            marker.write_text(
                json.dumps({"fingerprint": key, "source": uri, "bytes": sum(f.size for f in files.values())})
            )
            fd = _lock(marker, fcntl.LOCK_SH)  # leased from before it is visible
            try:
                os.rename(staging, entry)
            except OSError:  # another process cached it meanwhile
                os.close(fd)
                shutil.rmtree(staging, ignore_errors=True)
                return _lease(entry, key)
        except ObjectChangedError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise CheckpointChangedError(f"{exc}; {uri} changed while it was being cached") from exc
        except OSError as exc:  # the local disk (full, read-only); store failures are StoreErrors
            shutil.rmtree(staging, ignore_errors=True)
            log.warning("cannot fill the checkpoint cache %s (%s): reading %s in place", self.root, exc, uri)
            return None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return CacheLease(entry, fd)

    def entries(self) -> list[tuple[Path, int, float]]:
        """(folder, bytes, last use) of every entry this cache created, oldest first."""
        out = []
        if not self.root.is_dir():
            return out
        for entry in self.root.iterdir():
            if entry.name.startswith(".") or entry.is_symlink() or not entry.is_dir():
                continue
            if _marker_key(entry / MARKER) != entry.name:
                continue  # not made by this cache: never counted, never evicted
            out.append((entry, _entry_bytes(entry), entry.stat().st_mtime))
        return sorted(out, key=lambda e: e[2])

    def _make_room(self, need: int, uri: str) -> bool:
        """Evict unused entries, oldest first, until `need` bytes fit; False (after a warning,
        evicting nothing) when they cannot fit beside the entries in use."""
        entries = self.entries()
        locked: list[tuple[Path, int, int]] = []  # (entry, bytes, fd) held exclusively: not in use
        try:
            in_use = 0
            for entry, size, _ in entries:
                fd = _lock(entry / MARKER, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if fd is None:
                    in_use += size
                else:
                    locked.append((entry, size, fd))
            used = in_use + sum(e[1] for e in locked)
            if in_use + need > self.max_bytes:
                log.warning(
                    "checkpoint cache %s is too small for the working set: %s needs %d bytes, entries in use "
                    "hold %d, max_bytes is %d; reading it in place (raise storage.cache_max_gb)",
                    self.root,
                    uri,
                    need,
                    in_use,
                    self.max_bytes,
                )
                return False
            for entry, size, fd in locked:
                if used + need <= self.max_bytes:
                    break
                if not _same_file(fd, entry / MARKER):
                    continue
                grave = self.root / f".evicting-{uuid.uuid4().hex[:12]}"
                try:
                    os.rename(entry, grave)  # under the exclusive lock: no reader holds it
                except OSError as exc:
                    log.warning("cannot evict %s from the checkpoint cache: %s", entry, exc)
                    continue
                shutil.rmtree(grave, ignore_errors=True)
                used -= size
                log.info("evicted %s (%d bytes) from the checkpoint cache", entry.name, size)
            return True
        finally:
            for _, _, fd in locked:
                with contextlib.suppress(OSError):
                    os.close(fd)


def _marker_key(marker: Path) -> str | None:
    try:
        doc = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return doc.get("fingerprint") if isinstance(doc, dict) else None


def touch_seconds_ago(path: Path, seconds: float) -> None:
    """Set a cache entry's last use into the past (tests and maintenance)."""
    t = time.time() - seconds
    os.utime(path, (t, t))
