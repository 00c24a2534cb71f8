"""Writing checkpoints: shards as they fill, the index last, published atomically.

Tensors are spooled to a local temporary file as they arrive, so memory holds one tensor, not
a shard; when a shard is full its header and data stream to the store. Publishing never leaves
something that discovery would call a complete checkpoint before it is one:

- local folders are written into a hidden staging folder beside the target and renamed into
  place at the end (a crash leaves only a hidden `.NAME.partial-*` folder);
- object stores have no rename, so the writer first removes what made an older checkpoint at
  that URI complete (index, `model.safetensors`, marker), then writes config and tokenizer, the
  shards, the index, and the completion marker (when the store uses one) last. Until the index
  lands, a folder of lone shards is incomplete by definition (`reader.weight_layout`).

    with CheckpointWriter("s3://bkt/merged", source=base_ckpt, max_shard_bytes=2 << 30) as w:
        for name, t in tensors:
            w.add(name, t)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Mapping

import torch

from mergeaudit import store
from mergeaudit.checkpoint.format import build_header, dtype_name, tensor_bytes
from mergeaudit.checkpoint.reader import (
    CONFIG_FILE,
    INDEX_FILE,
    SINGLE_FILE,
    TOKENIZER_FILES,
    Checkpoint,
)
from mergeaudit.errors import CheckpointError

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
COPY_CHUNK = 16 * 1024 * 1024


class CheckpointWriter:
    """Stream tensors into a new checkpoint at out_uri; use as a context manager.

    Config and tokenizer files come from `source` (a Checkpoint or a folder URI); `config`
    replaces the config. `dtype` casts every tensor. `marker`, when given, names a completion
    marker file written last.
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
    ):
        if config is None and source is None:
            raise CheckpointError("a checkpoint writer needs a source checkpoint or a config")
        if max_shard_bytes <= 0:
            raise CheckpointError(f"max_shard_bytes must be positive, not {max_shard_bytes}")
        self.uri = store.check_uri(out_uri)
        self.dtype = dtype
        self.max_shard_bytes = max_shard_bytes
        self.metadata = dict(metadata or {})
        self.marker = marker
        self._loc = store.locate(self.uri)
        if self._loc.is_local:
            parent, name = os.path.split(self._loc.path.rstrip("/"))
            self._target = os.path.join(parent, f".{name}.partial-{uuid.uuid4().hex[:12]}")
        else:
            self._target = self.uri
            for stale in (INDEX_FILE, SINGLE_FILE, marker):
                if stale:
                    store.remove(store.join(self.uri, stale))
        self._entries: list[tuple[str, str, list[int], int]] = []
        self._spool = tempfile.TemporaryFile(prefix="mergeaudit-shard-")
        self._shard_bytes = 0
        self._total = 0
        self._shards: list[str] = []
        self._weight_map: dict[str, str] = {}
        self._closed = False
        self._write_config_and_tokenizer(source, config)

    def _write_config_and_tokenizer(self, source: Checkpoint | str | None, config: dict | None) -> None:
        src_files = {}
        if source is not None:
            src_files = source.files if isinstance(source, Checkpoint) else store.list_files(store.check_uri(source))
        if config is None:
            config = source.config if isinstance(source, Checkpoint) else json.loads(store.read_bytes(src_files[CONFIG_FILE].uri))
        cfg = dict(config)
        if self.dtype is not None:
            cfg.pop("torch_dtype", None)
            cfg["dtype"] = str(self.dtype).removeprefix("torch.")
        for name in TOKENIZER_FILES:
            if name in src_files:
                store.copy(src_files[name].uri, store.join(self._target, name))
        store.write_bytes(store.join(self._target, CONFIG_FILE), json.dumps(cfg, indent=2, sort_keys=True).encode())

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor; a full shard is written out before this one starts the next."""
        if self._closed:
            raise CheckpointError(f"writer for {self.uri} is closed")
        if name in self._weight_map or any(e[0] == name for e in self._entries):
            raise CheckpointError(f"tensor {name!r} written twice to {self.uri}")
        t = tensor.to(self.dtype) if self.dtype is not None else tensor
        data = tensor_bytes(t)
        if self._entries and self._shard_bytes + data.nbytes > self.max_shard_bytes:
            self._flush(f"model-{len(self._shards) + 1:05d}.safetensors")
        self._spool.write(data)
        self._entries.append((name, dtype_name(name, t), list(t.shape), data.nbytes))
        self._shard_bytes += data.nbytes
        self._total += data.nbytes

    def add_file(self, name: str, data: bytes) -> None:
        """Add a small non-weight file (a report, say); written before the index."""
        if self._closed:
            raise CheckpointError(f"writer for {self.uri} is closed")
        if name.endswith(".safetensors") or name in (INDEX_FILE, CONFIG_FILE) or "/" in name:
            raise CheckpointError(f"{name!r} cannot be added as an extra file")
        store.write_bytes(store.join(self._target, name), data)

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

    def close(self) -> str:
        """Write the last shard, the index and the marker, then publish; returns the URI."""
        if self._closed:
            return self.uri
        if not self._shards:
            self._flush(SINGLE_FILE)
        else:
            if self._entries:
                self._flush(f"model-{len(self._shards) + 1:05d}.safetensors")
            index = {"metadata": {"total_size": self._total}, "weight_map": self._weight_map}
            store.write_bytes(store.join(self._target, INDEX_FILE), json.dumps(index, indent=2).encode())
        if self.marker:
            stamp = dt.datetime.now(dt.timezone.utc).isoformat()
            body = {"shards": self._shards, "total_size": self._total, "written_at": stamp}
            store.write_bytes(store.join(self._target, self.marker), json.dumps(body).encode())
        self._spool.close()
        self._closed = True
        if self._loc.is_local:
            self._publish_local()
        else:
            self._remove_stray_shards()
        return self.uri

    def _publish_local(self) -> None:
        final = self._loc.path.rstrip("/")
        old = None
        if os.path.exists(final):
            parent, name = os.path.split(final)
            old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:12]}")
            os.rename(final, old)
        os.rename(self._target, final)
        if old:
            shutil.rmtree(old, ignore_errors=True)

    def _remove_stray_shards(self) -> None:
        keep = set(self._shards)
        for name, fi in store.list_files(self.uri).items():
            if name.endswith(".safetensors") and name not in keep:
                store.remove(fi.uri)

    def abort(self) -> None:
        """Drop what was written so far (best effort; it is incomplete either way)."""
        self._closed = True
        with contextlib.suppress(Exception):
            self._spool.close()
        if self._loc.is_local:
            shutil.rmtree(self._target, ignore_errors=True)
            return
        for shard in self._shards:
            with contextlib.suppress(Exception):
                store.remove(store.join(self.uri, shard))

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
