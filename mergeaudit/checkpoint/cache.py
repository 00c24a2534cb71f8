"""A read-through cache of whole checkpoints on local disk, keyed by fingerprint, size-limited.

Nightly runs audit mostly unchanged checkpoints; with a cache, the first run streams each
checkpoint's files to `CACHE_DIR/<fingerprint>/` (ranged reads of COPY_CHUNK, bounded memory)
and later runs read the local copy. A changed file changes the fingerprint, so stale bytes are
never served. Entries are evicted least-recently-used beyond `max_bytes`; a checkpoint larger
than the whole cache is read from the source instead.

    cache = CheckpointCache("/var/cache/mergeaudit", max_bytes=200 << 30)
    ck = Checkpoint.open("s3://bkt/step-400", cache=cache)
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from pathlib import Path

from mergeaudit import store

COPY_CHUNK = 64 * 1024 * 1024
log = logging.getLogger(__name__)


class CheckpointCache:
    def __init__(self, root: str | os.PathLike, max_bytes: int):
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self.root.mkdir(parents=True, exist_ok=True)

    def fetch(self, uri: str, files: dict[str, store.FileInfo]) -> str | None:
        """Local folder holding the checkpoint's files (downloading on a miss), or None when
        the checkpoint does not fit the cache or is already local."""
        if store.locate(uri).is_local:
            return None
        size = sum(f.size for f in files.values())
        if size > self.max_bytes:
            log.warning("checkpoint %s (%d bytes) is larger than the cache (%d): reading it in place",
                        uri, size, self.max_bytes)
            return None
        entry = self.root / store.fingerprint(list(files.values()))
        if entry.is_dir():
            os.utime(entry)  # recently used
            return str(entry)
        self._evict(keep_free=size)
        staging = self.root / f".partial-{uuid.uuid4().hex[:12]}"
        staging.mkdir()
        try:
            for name, fi in files.items():
                with open(staging / name, "wb") as out:
                    for start in range(0, fi.size, COPY_CHUNK):
                        out.write(store.read_range(fi.uri, start, min(fi.size, start + COPY_CHUNK)))
            os.rename(staging, entry)
        except FileExistsError:  # another process cached it meanwhile
            shutil.rmtree(staging, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return str(entry)

    def entries(self) -> list[tuple[Path, int, float]]:
        """(folder, bytes, last use) of every cached checkpoint, oldest first."""
        out = []
        for entry in self.root.iterdir():
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            size = sum(f.stat().st_size for f in entry.iterdir() if f.is_file())
            out.append((entry, size, entry.stat().st_mtime))
        return sorted(out, key=lambda e: e[2])

    def _evict(self, keep_free: int) -> None:
        entries = self.entries()
        used = sum(e[1] for e in entries)
        for entry, size, _ in entries:
            if used + keep_free <= self.max_bytes:
                break
            shutil.rmtree(entry, ignore_errors=True)
            used -= size
            log.info("evicted %s from the checkpoint cache", entry.name)


def touch_seconds_ago(path: Path, seconds: float) -> None:
    """Set a cache entry's last use into the past (tests and maintenance)."""
    t = time.time() - seconds
    os.utime(path, (t, t))
