"""Fingerprints hold from open to last byte: every read is pinned to the version the listing saw.

A checkpoint overwritten after `Checkpoint.open` (same size, different bytes: the case a size
check cannot see) fails with CheckpointChangedError instead of mixing old and new tensors; on
the S3 endpoint through If-Match, locally through size and mtime. Files are back-dated before
opening, as a checkpoint written hours before its audit is: a local rewrite within the same
tick of the file-system clock (a few ms) keeps size and mtime, and is not detectable by stat.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from mergeaudit import store
from mergeaudit.checkpoint import Checkpoint, write_checkpoint
from mergeaudit.errors import CheckpointChangedError, CheckpointError, ObjectChangedError, StoreError

CFG = {"model_type": "llama"}


def backdate(uri: str) -> None:
    """Make a local checkpoint's files an hour old, as a checkpoint under audit usually is."""
    loc = store.locate(uri)
    if loc.is_local:
        t = time.time() - 3600
        for name in os.listdir(loc.path):
            os.utime(os.path.join(loc.path, name), (t, t))


def overwrite_same_size(uri: str, name: str) -> None:
    """Rewrite one file with different bytes of the same size (in place when local)."""
    target = store.join(uri, name)
    blob = bytearray(store.read_bytes(target))
    tail = len(blob) - 64  # inside the data area: flip the last tensor's bytes
    blob[tail:] = bytes(b ^ 0xFF for b in blob[tail:])
    loc = store.locate(target)
    if loc.is_local:
        with open(loc.path, "r+b") as fh:  # in place: same inode, same size
            fh.write(blob)
    else:
        store.write_bytes(target, bytes(blob))


def make(root: str, tensors: dict, **kw) -> str:
    uri = write_checkpoint(store.join(root, "ck"), tensors.items(), config=CFG, **kw)
    backdate(uri)
    return uri


def test_store_reads_pinned_to_the_listed_version(store_root):
    uri = store.join(store_root, "d", "blob.bin")
    store.write_bytes(uri, b"a" * 256)
    backdate(store.join(store_root, "d"))
    listed = store.list_files(store.join(store_root, "d"))["blob.bin"]
    assert store.read_range(uri, 0, 4, expect=listed) == b"aaaa"
    assert store.read_bytes(uri, expect=listed.version) == b"a" * 256
    store.write_bytes(uri, b"b" * 256)
    for read in (
        lambda: store.read_range(uri, 0, 4, expect=listed),
        lambda: store.read_bytes(uri, expect=listed),
        lambda: store.read_into(uri, 8, bytearray(8), expect=listed),
    ):
        with pytest.raises(ObjectChangedError, match="changed since it was listed"):
            read()
    assert store.read_range(uri, 0, 4) == b"bbbb", "unpinned reads see the new version"
    assert isinstance(ObjectChangedError("x"), StoreError) and not store.is_transient(ObjectChangedError("x"))


def test_shard_overwritten_mid_audit_fails_the_read(store_root):
    tensors = {f"t{i}": torch.full((64,), float(i)) for i in range(6)}
    uri = make(store_root, tensors, max_shard_bytes=600)
    ck = Checkpoint.open(uri)
    shards = sorted(n for n in ck.files if n.endswith(".safetensors"))
    assert len(shards) >= 2
    stream = ck.iter_tensors(max_requests=1, window_bytes=1)
    assert next(stream)[0] == "t0"
    overwrite_same_size(uri, shards[-1])
    with pytest.raises(CheckpointChangedError, match="changed"):
        for _ in stream:
            pass
    with pytest.raises(CheckpointChangedError):
        ck.get(ck.keys()[-1])
    assert torch.equal(ck.get("t0"), tensors["t0"]), "files that did not change still read"
    fresh = Checkpoint.open(uri)
    assert fresh.fingerprint != ck.fingerprint, "reopening sees the new version under a new fingerprint"
    assert not torch.equal(fresh.get(ck.keys()[-1]), tensors[ck.keys()[-1]])


def test_large_local_tensor_mapped_after_an_overwrite_is_refused(tmp_path):
    big = torch.arange(700 * 1024, dtype=torch.float32).reshape(700, 1024)  # 2.8 MB: mapped
    uri = make(str(tmp_path), {"big": big})
    ck = Checkpoint.open(uri)
    overwrite_same_size(uri, "model.safetensors")
    with pytest.raises(CheckpointChangedError, match="'big' not read"):
        ck.get("big")


def test_changed_error_is_a_checkpoint_error_and_names_the_file(s3_bucket):
    uri = make(s3_bucket, {"a": torch.ones(16), "b": torch.zeros(16)})
    ck = Checkpoint.open(uri)
    overwrite_same_size(uri, "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        ck.get("b")
    assert isinstance(info.value, CheckpointChangedError)
    assert "model.safetensors" in str(info.value) and "If-Match" in str(info.value)


def test_config_replaced_between_listing_and_reading_is_refused(store_root, monkeypatch):
    from mergeaudit.checkpoint import reader

    uri = make(store_root, {"a": torch.ones(4)})
    real = reader.list_checkpoint_files

    def list_then_change(u):
        files = real(u)
        store.write_bytes(store.join(u, "config.json"), b'{"model_type": "llama", "x": 1}')
        return files

    monkeypatch.setattr(reader, "list_checkpoint_files", list_then_change)
    with pytest.raises(CheckpointChangedError):
        Checkpoint.open(uri)
