"""Blob stores against the real file system and a real S3 HTTP endpoint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from loraplex.registry.blobs import LocalBlobStore, S3BlobStore, open_blob_store
from loraplex.registry.errors import InvalidArgument, NotFound
from tests.fixtures.backends import Backend


def test_blob_store_contract(registry_backend: Backend, tmp_path: Path) -> None:
    store = open_blob_store(registry_backend.blobs_url, registry_backend.s3_endpoint)
    payload = os.urandom(9 * 1024 * 1024 + 123)  # above the 8 MiB multipart threshold
    source = tmp_path / "payload.bin"
    source.write_bytes(payload)
    key = "sha256/" + "ab" * 32
    assert not store.exists(key)
    with pytest.raises(NotFound):
        store.size(key)
    store.put_file(key, source)
    store.put_file(key, source)  # idempotent
    assert store.exists(key) and store.size(key) == len(payload)
    assert b"".join(store.open_range(key)) == payload
    chunks = list(store.open_range(key, 5_000_000))
    assert b"".join(chunks) == payload[5_000_000:]
    assert max(len(c) for c in chunks) <= 1024 * 1024
    listed = list(store.list("sha256/"))
    assert [(b.key, b.size) for b in listed] == [(key, len(payload))]
    assert listed[0].modified.tzinfo is not None
    store.delete(key)
    assert not store.exists(key) and list(store.list("sha256/")) == []
    with pytest.raises(NotFound):
        b"".join(store.open_range(key))
    for bad in ("../x", "/abs", "a//b", ""):
        with pytest.raises(InvalidArgument):
            store.exists(bad)


def test_local_put_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    missing = tmp_path / "does-not-exist"
    with pytest.raises(FileNotFoundError):
        store.put_file("sha256/" + "cd" * 32, missing)
    assert not store.exists("sha256/" + "cd" * 32)
    assert [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()] == []


def test_open_blob_store_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = open_blob_store("file://./rel/dir")
    assert isinstance(relative, LocalBlobStore) and (tmp_path / "rel" / "dir").is_dir()
    absolute = open_blob_store(f"file://{tmp_path}/abs")
    assert isinstance(absolute, LocalBlobStore) and (tmp_path / "abs").is_dir()
    s3 = open_blob_store("s3://bucket-name/some/prefix", "http://127.0.0.1:9")
    assert isinstance(s3, S3BlobStore) and (s3.bucket, s3.prefix) == ("bucket-name", "some/prefix")
    for bad in ("http://x/y", "s3://", "ftp://a/b"):
        with pytest.raises(InvalidArgument):
            open_blob_store(bad)


def test_s3_never_creates_buckets(s3_endpoint: str) -> None:
    store = open_blob_store("s3://no-such-bucket-here/x", s3_endpoint)
    assert isinstance(store, S3BlobStore)
    with pytest.raises(Exception) as info:
        list(store.list("sha256/"))
    assert info.type.__name__ in ("Unavailable", "NotFound")
    import boto3

    names = [b["Name"] for b in boto3.client("s3", endpoint_url=s3_endpoint).list_buckets()["Buckets"]]
    assert "no-such-bucket-here" not in names
