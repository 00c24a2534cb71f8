"""The storage settings: `storage:` in an audit's YAML, and how every stage opens a checkpoint.

storage = StorageSettings(cache="auto", completion_marker="_COMPLETE")
ck = storage.open("s3://bkt/step-400")   # through the read-through cache for object stores
"""

from __future__ import annotations

from typing import Literal

import pydantic

from mergeaudit.checkpoint.cache import CheckpointCache, default_cache_dir
from mergeaudit.checkpoint.reader import Checkpoint
from mergeaudit.fields import LocalPath
from mergeaudit.frozen import Frozen


class StorageSettings(Frozen):
    """How checkpoints are read: credentials, completeness marker, local read-through cache."""

    credentials_block: str | None = pydantic.Field(
        None,
        pattern=r"^(aws-credentials|minio-credentials)/[A-Za-z0-9_-]+$",
        description="Prefect block holding S3 credentials ('aws-credentials/NAME' or "
        "'minio-credentials/NAME'); default: the standard AWS environment.",
    )
    completion_marker: str | None = pydantic.Field(
        None,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="File a checkpoint folder must hold to count as complete (e.g. _COMPLETE).",
    )
    cache: Literal["auto", "off"] = pydantic.Field(
        "auto",
        description="auto: checkpoints on object stores (s3://, memory://) are copied once into a local "
        "read-through cache keyed by fingerprint and read from there (local paths are read in place); off: every "
        "read goes to the store.",
    )
    cache_dir: LocalPath | None = pydantic.Field(
        None,
        description="Folder of the cache (default: $MERGEAUDIT_CACHE_DIR, else "
        "$XDG_CACHE_HOME/mergeaudit/checkpoints, else ~/.cache/mergeaudit/checkpoints).",
    )
    cache_max_gb: float = pydantic.Field(
        100.0,
        gt=0,
        description="Size limit of the cache in GiB; least recently used entries are evicted, and a "
        "checkpoint that does not fit is read in place, with a warning.",
    )

    def open(self, uri: str) -> Checkpoint:
        """Open a checkpoint through the read-through cache (unless `cache` is off; it copies
        checkpoints on object stores, and local ones are read in place)."""
        cache = None
        if self.cache != "off":
            cache = CheckpointCache(self.cache_dir or default_cache_dir(), max_bytes=int(self.cache_max_gb * 1024**3))
        return Checkpoint.open(uri, cache=cache)
