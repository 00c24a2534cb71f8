"""Writing checkpoints: shards as they fill, the index last, published by a final swap.

Tensors are spooled to a local temporary file as they arrive, so memory holds one tensor, not
a shard; when a shard is full its header and data stream to the store.

The writer never deletes or overwrites data it did not create. Before anything is written,
`check_output` refuses (with `UnsafeOutputError`) an OUT that is equal to, inside or containing
a protected URI (the source checkpoint and whatever the caller passes as `protect`: a merge's
inputs and its config), compared as normalised URIs (realpath for local paths, scheme, bucket
and key components for object stores). An existing, non-empty OUT is refused unless it is a
previous mergeaudit output (it holds the `mergeaudit.json` this writer puts into every
checkpoint, or the `mergeaudit_merge.json` report of merges written before that file existed),
holds only files mergeaudit wrote, and the caller passed `overwrite=True`.

Publishing never leaves something that discovery would call a complete checkpoint before it
is one, and a failure at any point leaves an old checkpoint at OUT readable and unchanged:

- local folders are written into a hidden staging folder beside the target; at the end the old
  folder (if any) is renamed aside, the new one renamed into place, and only then is the old
  one removed (a crash leaves only hidden `.NAME.partial-*` / `.NAME.old-*` folders);
- object stores have no rename. A fresh destination first gets a `mergeaudit.json` stub (so a
  crashed first write is recognisable as mergeaudit's), then the shards, then extra files,
  tokenizer, `mergeaudit.json` and config, then the index, and the completion marker (when the
  store uses one) last; a single `model.safetensors` is written just before the config. When
  replacing a checkpoint, the new shards go under fresh names (`model-<token>-00001.safetensors`)
  beside the old files, which stay untouched while tensors stream; the replacement is always
  sharded with an index, even when one file would do, so that the index PUT is the swap (readers
  follow the index); after it, the old files the new checkpoint does not use are deleted (those
  the old `mergeaudit.json` lists, or the old index's shards and `model.safetensors`). Between
  the config PUT and the index PUT, a reader may see the new config with the old weights.
  Two writers publishing to the same OUT at once are not supported.

    with CheckpointWriter("s3://bkt/merged", source=base_ckpt, max_shard_bytes=2 << 30) as w:
        for name, t in tensors:
            w.add(name, t)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

import mergeaudit
from mergeaudit import store
from mergeaudit.checkpoint.format import build_header, dtype_name, tensor_bytes
from mergeaudit.checkpoint.reader import (
    CONFIG_FILE,
    INDEX_FILE,
    SINGLE_FILE,
    TOKENIZER_FILES,
    Checkpoint,
)
from mergeaudit.errors import CheckpointError, MergeAuditError, UnsafeOutputError

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
COPY_CHUNK = 16 * 1024 * 1024
PROVENANCE_FILE = "mergeaudit.json"
PROVENANCE_FORMAT = "mergeaudit.checkpoint/1"
# The report run_merge adds (mergeaudit.merging.executor.REPORT_FILE): merges written before
# PROVENANCE_FILE existed are recognised by it.
LEGACY_REPORT_FILE = "mergeaudit_merge.json"
_SHARD_NAME = re.compile(r"^model(-[0-9a-f]{12})?-[0-9]{5}\.safetensors$|^model\.safetensors$")


@dataclass(frozen=True)
class ExistingOutput:
    """A previous mergeaudit output at OUT: its files, and those mergeaudit wrote (may delete)."""

    files: dict[str, store.FileInfo]
    owned: frozenset[str]


def _components(uri: str) -> tuple[str, tuple[str, ...]]:
    """(scheme, path components) of a URI: realpath for local paths, bucket first for S3."""
    scheme, rest = store.split_scheme(store.check_uri(uri))
    if scheme == "file":
        rest = os.path.realpath(rest)
    return scheme, tuple(p for p in rest.split("/") if p and p != ".")


def relation(out_uri: str, other_uri: str) -> str | None:
    """'equal to', 'inside' or 'contains' when out_uri and other_uri overlap, else None.
    Components are compared whole: s3://b/a does not contain s3://b/ab."""
    (s1, a), (s2, b) = _components(out_uri), _components(other_uri)
    if s1 != s2:
        return None
    if a == b:
        return "equal to"
    if a[: len(b)] == b:
        return "inside"
    if b[: len(a)] == a:
        return "contains"
    return None


def check_output(out_uri: str, protect: Iterable[str] = (), overwrite: bool = False) -> ExistingOutput | None:
    """Refuse an unsafe OUT before anything is read or written; returns what exists there when
    it is a previous mergeaudit output the caller asked to replace, None when OUT is fresh."""
    out = store.check_uri(out_uri)
    problems = []
    for other in dict.fromkeys(protect):
        rel = relation(out, other)
        if rel == "contains":
            problems.append(f"it contains {other}, which replacing it would delete")
        elif rel is not None:
            problems.append(f"it is {rel} {other}, an input of this job")
    if problems:
        raise UnsafeOutputError(f"refusing to write to {out}: " + "; ".join(problems) + "; choose another output")
    return _existing(out, overwrite)


def _existing(out: str, overwrite: bool) -> ExistingOutput | None:
    loc = store.locate(out)
    if loc.is_local:
        if not os.path.lexists(loc.path):
            return None
        if not os.path.isdir(loc.path) or os.path.islink(loc.path):
            raise UnsafeOutputError(f"refusing to write to {out}: it exists and is not a folder mergeaudit wrote")
        if not os.listdir(loc.path):
            return None
    elif not store.exists(out):
        return None
    files, dirs = store.list_files(out), store.list_dirs(out)
    if not files and not dirs:
        return None
    owned = _owned_files(files)
    if owned is None:
        raise UnsafeOutputError(
            f"refusing to write to {out}: it exists and was not written by mergeaudit (no {PROVENANCE_FILE}); "
            "it is not replaced even with --overwrite; choose another output"
        )
    foreign = sorted(set(files) - owned) + [store.basename(d) + "/" for d in dirs]
    if foreign:
        raise UnsafeOutputError(
            f"refusing to write to {out}: it holds files mergeaudit did not write ({', '.join(foreign[:10])}); "
            "move them away first"
        )
    if not overwrite:
        raise UnsafeOutputError(
            f"refusing to write to {out}: it holds a previous mergeaudit output; pass --overwrite "
            "(overwrite=True) to replace it"
        )
    return ExistingOutput(files, frozenset(owned))


def _read_small_json(fi: store.FileInfo) -> dict | None:
    if fi.size > 64 * 1024 * 1024:
        return None
    with contextlib.suppress(MergeAuditError, ValueError):
        doc = json.loads(store.read_bytes(fi.uri))
        return doc if isinstance(doc, dict) else None
    return None


def _owned_files(files: dict[str, store.FileInfo]) -> set[str] | None:
    """The files of a previous mergeaudit output at OUT, or None when it is not one."""
    prov = _read_small_json(files[PROVENANCE_FILE]) if PROVENANCE_FILE in files else None
    if prov is not None and prov.get("format") == PROVENANCE_FORMAT:
        listed = prov.get("files")
        owned = {PROVENANCE_FILE}
        if isinstance(listed, list):
            owned |= {f for f in listed if isinstance(f, str) and "/" not in f and f not in ("", ".", "..")}
        # shards of a writer killed before it listed them
        owned |= {n for n in files if _SHARD_NAME.match(n)}
    else:
        report = _read_small_json(files[LEGACY_REPORT_FILE]) if LEGACY_REPORT_FILE in files else None
        if report is None or "mergeaudit_version" not in report:
            return None
        # what a merge wrote before PROVENANCE_FILE existed
        owned = {LEGACY_REPORT_FILE, CONFIG_FILE, INDEX_FILE, *TOKENIZER_FILES}
        owned |= {n for n in files if n.endswith(".safetensors")}
    if INDEX_FILE in files and INDEX_FILE in owned:
        index = _read_small_json(files[INDEX_FILE]) or {}
        weight_map = index.get("weight_map")
        if isinstance(weight_map, dict):
            owned |= {
                v for v in weight_map.values() if isinstance(v, str) and "/" not in v and v.endswith(".safetensors")
            }
    return owned & set(files)


class CheckpointWriter:
    """Stream tensors into a new checkpoint at out_uri; use as a context manager.

    Config and tokenizer files come from `source` (a Checkpoint or a folder URI); `config`
    replaces the config. `dtype` casts every tensor. `marker`, when given, names a completion
    marker file written last. `protect` lists URIs OUT must not overlap (the source is always
    protected); `overwrite=True` allows replacing a previous mergeaudit output (see the module
    docstring).
    """

    def __init__(
        self,
        out_uri: str,
        *,
        source: Checkpoint | str | None = None,
        config: dict | None = None,
        dtype: torch.dtype | None = None,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        metadata: Mapping[str, str] | None = None,
        marker: str | None = None,
        overwrite: bool = False,
        protect: Iterable[str] = (),
    ):
        if config is None and source is None:
            raise CheckpointError("a checkpoint writer needs a source checkpoint or a config")
        if max_shard_bytes <= 0:
            raise CheckpointError(f"max_shard_bytes must be positive, not {max_shard_bytes}")
        if marker is not None and (not marker or "/" in marker or marker in (INDEX_FILE, CONFIG_FILE, PROVENANCE_FILE)):
            raise CheckpointError(f"{marker!r} cannot be a completion marker")
        self.uri = store.check_uri(out_uri)
        self.dtype = dtype
        self.max_shard_bytes = max_shard_bytes
        self.metadata = dict(metadata or {})
        self.marker = marker
        self.overwrite = overwrite
        self._protect = [*protect]
        if source is not None:
            self._protect.append(source.uri if isinstance(source, Checkpoint) else store.check_uri(source))
        self._existing = check_output(self.uri, self._protect, overwrite)
        self._loc = store.locate(self.uri)
        self._token = uuid.uuid4().hex[:12]
        # On an object store, a replacement goes under fresh shard names beside the old files.
        self._fresh_names = not self._loc.is_local and self._existing is not None
        self._entries: list[tuple[str, str, list[int], int]] = []
        self._spool = tempfile.TemporaryFile(prefix="mergeaudit-shard-")
        self._shard_bytes = 0
        self._total = 0
        self._shards: list[str] = []
        self._weight_map: dict[str, str] = {}
        self._extras: dict[str, bytes] = {}
        self._closed = False
        self._single = False
        self._stub = False
        self._config = self._resolve_config(source, config)
        self._tokenizer = self._tokenizer_files(source)
        self._source_lease = getattr(source, "cache_lease", None)  # its tokenizer files are copied at the end
        if self._loc.is_local:
            parent, name = os.path.split(self._loc.path.rstrip("/"))
            self._target = os.path.join(parent, f".{name}.partial-{self._token}")
            self._write_config_and_tokenizer()
        else:
            self._target = self.uri
            if self._existing is None:  # claim the fresh destination as mergeaudit's
                self._write_provenance({"status": "writing"})
                self._stub = True

    # -- setup -------------------------------------------------------------------------------
    def _resolve_config(self, source: Checkpoint | str | None, config: dict | None) -> dict:
        if config is None:
            if isinstance(source, Checkpoint):
                config = source.config
            else:
                files = store.list_files(store.check_uri(source))
                if CONFIG_FILE not in files:
                    raise CheckpointError(f"source {source} has no {CONFIG_FILE}")
                config = json.loads(store.read_bytes(files[CONFIG_FILE].uri))
        cfg = dict(config)
        if self.dtype is not None:
            cfg.pop("torch_dtype", None)
            cfg["dtype"] = str(self.dtype).removeprefix("torch.")
        return cfg

    @staticmethod
    def _tokenizer_files(source: Checkpoint | str | None) -> dict[str, str]:
        if source is None:
            return {}
        files = source.files if isinstance(source, Checkpoint) else store.list_files(store.check_uri(source))
        lease = getattr(source, "cache_lease", None)
        if lease is not None:  # the read-through cache's copy of the same files
            files = store.list_files(lease.path)
        return {name: files[name].uri for name in TOKENIZER_FILES if name in files}

    def _write_config_and_tokenizer(self) -> None:
        for name, uri in self._tokenizer.items():
            store.copy(uri, store.join(self._target, name))
        store.write_bytes(
            store.join(self._target, CONFIG_FILE), json.dumps(self._config, indent=2, sort_keys=True).encode()
        )

    def _write_provenance(self, extra: dict | None = None) -> None:
        body = {
            "format": PROVENANCE_FORMAT,
            "mergeaudit_version": mergeaudit.__version__,
            "written_at": dt.datetime.now(dt.timezone.utc).isoformat(),
            "files": sorted(self._new_files()),
            "shards": [SINGLE_FILE] if self._single else self._shards,
            "total_size": self._total,
            **(extra or {}),
        }
        store.write_bytes(store.join(self._target, PROVENANCE_FILE), json.dumps(body, indent=1).encode())

    def _new_files(self) -> set[str]:
        names = {CONFIG_FILE, PROVENANCE_FILE, *self._tokenizer, *self._extras, *self._shards}
        names.add(SINGLE_FILE if self._single else INDEX_FILE)
        if self.marker:
            names.add(self.marker)
        return names

    # -- streaming -----------------------------------------------------------------------------
    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor; a full shard is written out before this one starts the next."""
        if self._closed:
            raise CheckpointError(f"writer for {self.uri} is closed")
        if name in self._weight_map or any(e[0] == name for e in self._entries):
            raise CheckpointError(f"tensor {name!r} written twice to {self.uri}")
        t = tensor.to(self.dtype) if self.dtype is not None else tensor
        data = tensor_bytes(t)
        if self._entries and self._shard_bytes + data.nbytes > self.max_shard_bytes:
            self._flush(self._shard_name())
        self._spool.write(data)
        self._entries.append((name, dtype_name(name, t), list(t.shape), data.nbytes))
        self._shard_bytes += data.nbytes
        self._total += data.nbytes

    def add_file(self, name: str, data: bytes) -> None:
        """Add a small non-weight file (a report, say); published with the checkpoint."""
        if self._closed:
            raise CheckpointError(f"writer for {self.uri} is closed")
        if (
            name.endswith(".safetensors")
            or name in (INDEX_FILE, CONFIG_FILE, PROVENANCE_FILE, self.marker)
            or "/" in name
            or name.startswith(".")
            or not name
        ):
            raise CheckpointError(f"{name!r} cannot be added as an extra file")
        self._extras[name] = bytes(data)
        if self._loc.is_local:
            store.write_bytes(store.join(self._target, name), data)

    def _shard_name(self) -> str:
        n = len(self._shards) + 1
        return f"model-{self._token}-{n:05d}.safetensors" if self._fresh_names else f"model-{n:05d}.safetensors"

    def _flush(self, shard: str) -> None:
        header = build_header(self._entries, self.metadata)
        self._spool.seek(0)
        with store.open_write(store.join(self._target, shard)) as out:
            out.write(header)
            shutil.copyfileobj(self._spool, out, COPY_CHUNK)
        self._spool.seek(0)
        self._spool.truncate()
        for entry in self._entries:
            self._weight_map[entry[0]] = shard
        self._shards.append(shard)
        self._entries = []
        self._shard_bytes = 0

    # -- publishing ------------------------------------------------------------------------------
    def close(self) -> str:
        """Write the last shard, the index and the marker, then publish; returns the URI."""
        if self._closed:
            return self.uri
        # One model.safetensors when everything fit one shard, except when replacing on an
        # object store: there the index PUT must be the swap.
        self._single = not self._shards and not self._fresh_names
        try:
            if self._loc.is_local:
                if self._entries or not self._shards:
                    self._flush(SINGLE_FILE if self._single else self._shard_name())
                self._write_provenance()
                if not self._single:
                    self._write_index()
                self._write_marker()
            else:
                if (self._entries or not self._shards) and not self._single:
                    self._flush(self._shard_name())
                for name, data in self._extras.items():
                    store.write_bytes(store.join(self._target, name), data)
                self._write_provenance()
                if self._single:
                    self._flush(SINGLE_FILE)
                    self._write_config_and_tokenizer()  # the checkpoint is complete from here
                else:
                    self._write_config_and_tokenizer()
                    self._write_index()  # the swap: readers follow the index from here
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self._spool.close()
        if self._loc.is_local:
            self._publish_local()
        else:
            self._write_marker()
            self._remove_replaced()
        return self.uri

    def _write_index(self) -> None:
        index = {"metadata": {"total_size": self._total}, "weight_map": self._weight_map}
        store.write_bytes(store.join(self._target, INDEX_FILE), json.dumps(index, indent=2).encode())

    def _write_marker(self) -> None:
        if self.marker:
            stamp = dt.datetime.now(dt.timezone.utc).isoformat()
            body = {"shards": self._shards, "total_size": self._total, "written_at": stamp}
            store.write_bytes(store.join(self._target, self.marker), json.dumps(body).encode())

    def _publish_local(self) -> None:
        final = self._loc.path.rstrip("/")
        # What is at OUT now must still be what check_output allowed (or nothing).
        try:
            now = _existing(self.uri, self.overwrite)
        except UnsafeOutputError:
            shutil.rmtree(self._target, ignore_errors=True)
            raise
        old = None
        if now is not None:
            parent, name = os.path.split(final)
            old = os.path.join(parent, f".{name}.old-{self._token}")
            os.rename(final, old)
        elif os.path.isdir(final):
            os.rmdir(final)  # empty; fails if something arrived meanwhile
        try:
            os.rename(self._target, final)
        except BaseException:
            if old:
                os.rename(old, final)
            raise
        if old:  # only once the new checkpoint is in place
            shutil.rmtree(old, ignore_errors=True)

    def _remove_replaced(self) -> None:
        if self._existing is None:
            return
        for name in sorted(self._existing.owned - self._new_files()):
            with contextlib.suppress(MergeAuditError):
                store.remove(self._existing.files[name].uri)

    def abort(self) -> None:
        """Drop what was written so far; an old checkpoint at OUT is left as it was."""
        self._closed = True
        with contextlib.suppress(Exception):
            self._spool.close()
        if self._loc.is_local:
            shutil.rmtree(self._target, ignore_errors=True)
            return
        for name in [*self._shards, *([PROVENANCE_FILE] if self._stub else [])]:
            if self._existing is not None and name in self._existing.files:
                continue  # never the old checkpoint's files
            with contextlib.suppress(Exception):
                store.remove(store.join(self.uri, name))

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_checkpoint(out_uri: str, tensors: Iterable[tuple[str, torch.Tensor]], **kwargs) -> str:
    """Write (name, tensor) pairs as a checkpoint; see CheckpointWriter for the options."""
    with CheckpointWriter(out_uri, **kwargs) as writer:
        for name, tensor in tensors:
            writer.add(name, tensor)
    return writer.uri
