"""store.copy streams: bounded chunk reads, identical bytes, atomic destination; local and S3."""

from __future__ import annotations

import os
import tracemalloc

import pytest

from mergeaudit import store, store_reads
from mergeaudit.errors import ObjectChangedError, StoreError

CHUNK = 1024 * 1024  # S3 parts are at least 5 MiB: the objects below span two


@pytest.fixture
def reads(monkeypatch):
    """Every read's size, by object URI (the tally every store read reports to)."""
    seen: dict[str, list[int]] = {}
    count = store_reads._count

    def record(uri: str, nbytes: int) -> None:
        seen.setdefault(uri, []).append(nbytes)
        count(uri, nbytes)

    monkeypatch.setattr(store_reads, "_count", record)
    return seen


def test_copy_reads_in_bounded_chunks_and_keeps_the_bytes(store_root, tmp_path, monkeypatch, reads):
    monkeypatch.setattr(store, "COPY_CHUNK_BYTES", CHUNK)
    payload = os.urandom(6 * CHUNK + 123)
    src = store.join(store_root, "src", "blob.bin")
    store.write_bytes(src, payload)
    for dst in (store.join(store_root, "dst", "blob.bin"), str(tmp_path / "local" / "blob.bin")):
        reads.clear()
        store.copy(src, dst)
        assert reads[store.check_uri(src)] == [CHUNK] * 6 + [123]
        assert store.read_bytes(dst) == payload
    store.copy(str(tmp_path / "local" / "blob.bin"), store.join(store_root, "back.bin"))  # local to S3 too
    assert store.read_bytes(store.join(store_root, "back.bin")) == payload


def test_copy_of_an_empty_object(store_root):
    store.write_bytes(store.join(store_root, "empty"), b"")
    store.copy(store.join(store_root, "empty"), store.join(store_root, "copy"))
    assert store.exists(store.join(store_root, "copy")) and store.read_bytes(store.join(store_root, "copy")) == b""


def test_copy_that_fails_part_way_leaves_nothing(store_root, monkeypatch):
    monkeypatch.setattr(store, "COPY_CHUNK_BYTES", CHUNK)
    src, dst = store.join(store_root, "a", "src.bin"), store.join(store_root, "b", "dst.bin")
    store.write_bytes(src, os.urandom(8 * CHUNK))
    read_into, calls = store_reads.read_into, []

    def failing(uri, start, buf, expect=None):
        calls.append(start)
        if len(calls) == 7:  # after the first 5 MiB part went up
            raise StoreError(f"cannot read {uri}: injected")
        read_into(uri, start, buf, expect=expect)

    monkeypatch.setattr(store_reads, "read_into", failing)
    with pytest.raises(StoreError, match="injected"):
        store.copy(src, dst)
    assert not store.exists(dst)
    if store_root.startswith("s3://"):
        import boto3

        bucket = store_root.split("/")[2]
        assert not boto3.client("s3").list_multipart_uploads(Bucket=bucket).get("Uploads"), "upload aborted"
    else:
        assert not os.listdir(os.path.dirname(dst)), "no temporary file left behind"


def test_copy_refuses_a_source_replaced_mid_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "COPY_CHUNK_BYTES", CHUNK)
    src, dst = str(tmp_path / "src.bin"), str(tmp_path / "out" / "dst.bin")
    store.write_bytes(src, os.urandom(3 * CHUNK))
    read_into = store_reads.read_into

    def replace_after_first(uri, start, buf, expect=None):
        read_into(uri, start, buf, expect=expect)
        if start == 0:
            store.write_bytes(src, os.urandom(3 * CHUNK + 1))

    monkeypatch.setattr(store_reads, "read_into", replace_after_first)
    with pytest.raises(ObjectChangedError):
        store.copy(src, dst)
    assert not os.path.exists(dst)


def test_copy_memory_is_bounded_by_the_chunk_not_the_object(tmp_path):
    """64 MiB through the default 16 MiB chunk: the whole object was in memory before (64 MiB peak)."""
    size = 64 * 1024 * 1024
    src = tmp_path / "big.bin"
    with open(src, "wb") as fh:
        for _ in range(size // (4 * 1024 * 1024)):
            fh.write(os.urandom(4 * 1024 * 1024))
    tracemalloc.start()
    try:
        store.copy(str(src), str(tmp_path / "copy.bin"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < store.COPY_CHUNK_BYTES + 4 * 1024 * 1024 < size
    with open(src, "rb") as a, open(tmp_path / "copy.bin", "rb") as b:
        while block := a.read(8 * 1024 * 1024):
            assert block == b.read(8 * 1024 * 1024)
        assert b.read(1) == b""
