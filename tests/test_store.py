"""Store: URIs, ranged reads, atomic writes, listings, fingerprints; local folder and S3."""

from __future__ import annotations

import os

import pytest

from mergeaudit import store
from mergeaudit.errors import StoreError, TransientStoreError


def test_unknown_scheme_is_a_store_error():
    with pytest.raises(StoreError, match="unknown store scheme 'gs'"):
        store.check_uri("gs://bucket/x")


def test_plain_paths_and_file_uris_agree(tmp_path):
    assert store.check_uri(f"file://{tmp_path}") == store.check_uri(str(tmp_path))
    assert store.join(str(tmp_path), "a", "b") == f"{tmp_path}/a/b"
    assert store.join("s3://bkt/x/", "y") == "s3://bkt/x/y"


def test_roundtrip_ranges_listing_and_fingerprints(store_root):
    uri = store.join(store_root, "ck", "blob.bin")
    payload = bytes(range(256)) * 64
    store.write_bytes(uri, payload)
    assert store.exists(uri)
    assert store.read_bytes(uri) == payload
    assert store.read_range(uri, 10, 20) == payload[10:20]
    with pytest.raises(StoreError, match="short read"):
        store.read_range(uri, len(payload) - 4, len(payload) + 4)
    files = store.list_files(store.join(store_root, "ck"))
    assert list(files) == ["blob.bin"] and files["blob.bin"].size == len(payload)
    fp1 = store.fingerprint(list(files.values()))
    store.write_bytes(uri, payload[::-1])
    fp2 = store.fingerprint(list(store.list_files(store.join(store_root, "ck")).values()))
    assert fp1 != fp2, "a rewritten file must change the fingerprint"
    assert store.list_dirs(store_root) == [store.join(store_root, "ck")]


def test_missing_object_names_the_uri(store_root):
    uri = store.join(store_root, "nope.bin")
    with pytest.raises(StoreError, match="nope.bin: not found"):
        store.read_bytes(uri)


def test_local_write_leaves_no_temporary_files(tmp_path):
    uri = str(tmp_path / "d" / "f.bin")
    store.write_bytes(uri, b"x")
    assert os.listdir(tmp_path / "d") == ["f.bin"]


def test_missing_credentials_are_a_clear_error_without_secrets(s3_bucket, monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StoreError, match="no AWS credentials") as info:
        store.read_bytes(s3_bucket + "/x")
    assert "testing-secret-key" not in str(info.value)


def test_transient_classification():
    class FakeClientError(Exception):
        def __init__(self, code, status):
            self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}

    assert store.is_transient(ConnectionResetError())
    assert store.is_transient(FakeClientError("SlowDown", 503))
    assert store.is_transient(FakeClientError("InternalError", 500))
    assert not store.is_transient(FakeClientError("NoSuchKey", 404))
    assert not store.is_transient(StoreError("bad"))
    assert store.is_transient(TransientStoreError("x"))
    assert not store.is_transient(ValueError("bad input"))
