"""Garbage collection on both back ends: orphans go only after the grace period, referenced blobs never."""

from __future__ import annotations

import os
import time
from pathlib import Path

from loraplex.registry.service import RegistryService
from tests.fixtures.backends import Backend
from tests.fixtures.hf import read_adapter
from tests.registry.helpers import sha256, upload


def _orphan(service: RegistryService, tmp_path: Path, payload: bytes) -> str:
    source = tmp_path / "orphan.bin"
    source.write_bytes(payload)
    key = f"sha256/{sha256(payload)}"
    service.blobs.put_file(key, source)
    return key


def test_gc_respects_grace_and_references(
    service: RegistryService, tiny_adapters: dict[str, dict[str, Path]], tmp_path: Path
) -> None:
    service.create_adapter("acme/g", "tiny-llama")
    config, weights = read_adapter(tiny_adapters["llama"]["qv-r4"])
    kept = upload(service, "acme/g", config, weights)
    orphan = _orphan(service, tmp_path, b"not referenced by any version")

    report = service.gc(grace_seconds=3600)
    assert report.deleted == [] and report.kept_recent == 1 and report.referenced == 1
    assert service.blobs.exists(orphan)

    time.sleep(1.1)  # S3 LastModified has one-second resolution
    dry = service.gc(grace_seconds=0.5, dry_run=True)
    assert dry.deleted == [orphan] and service.blobs.exists(orphan)
    report = service.gc(grace_seconds=0.5)
    assert report.deleted == [orphan] and report.referenced == 1
    assert not service.blobs.exists(orphan)
    assert service.blobs.exists(kept.blob_key)
    _, chunks = service.open_download("acme/g")
    assert b"".join(chunks) == weights

    # Deleting the last version makes its blob an orphan; gc (no grace) then removes it.
    service.delete_version("acme/g", 1)
    assert service.gc(grace_seconds=0).deleted == [kept.blob_key]
    assert list(service.blobs.list("sha256/")) == []


def test_gc_removes_stale_spool_files(service: RegistryService) -> None:
    stale = service.new_spool_file()
    fresh = service.new_spool_file()
    old = time.time() - 7200
    os.utime(stale, (old, old))
    report = service.gc(grace_seconds=3600)
    assert report.spool_files_deleted == 1
    assert not stale.exists() and fresh.exists()


def test_reput_refreshes_an_old_orphan(service: RegistryService, tmp_path: Path) -> None:
    """An upload that re-puts an old orphan blob makes it recent again, so a concurrent gc keeps it."""
    key = _orphan(service, tmp_path, b"shared bytes")
    time.sleep(1.1)
    _orphan(service, tmp_path, b"shared bytes")  # same content: idempotent put, refreshed time
    assert service.gc(grace_seconds=1.0).deleted == []
    assert service.blobs.exists(key)


def _start_multipart(endpoint: str, bucket: str, key: str, size: int) -> str:
    """An S3 multipart upload with one part, never completed: what a registry killed mid-``put_file`` leaves."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    upload_id: str = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    client.upload_part(Bucket=bucket, Key=key, PartNumber=1, UploadId=upload_id, Body=b"p" * size)
    return upload_id


def _open_multipart_keys(endpoint: str, bucket: str) -> set[str]:
    import boto3

    uploads = boto3.client("s3", endpoint_url=endpoint).list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    return {u["Key"] for u in uploads}


def test_gc_removes_what_interrupted_writes_left_and_counts_it_all(
    service: RegistryService, registry_backend: Backend, tmp_path: Path
) -> None:
    """Staged uploads, local ``.tmp-*`` files and S3 multipart uploads go after the grace period; the report
    counts every removal and its bytes (it used to say "deleted 0" after removing gigabytes)."""
    orphan = _orphan(service, tmp_path, b"o" * 1000)
    stale_spool = service.new_spool_file()
    stale_spool.write_bytes(b"s" * 3000)
    expected_temp = expected_multipart = 0
    outside = ""
    if registry_backend.s3_endpoint is None:
        root = Path(registry_backend.blobs_url.removeprefix("file://"))
        for i, size in enumerate((5000, 7000)):
            temp = root / "sha256" / f".tmp-killed{i}"
            temp.write_bytes(b"t" * size)
        expected_temp, incomplete_bytes = 2, 12000
    else:
        bucket, prefix = registry_backend.blobs_url.removeprefix("s3://").split("/", 1)
        for i, size in enumerate((5000, 7000)):
            _start_multipart(registry_backend.s3_endpoint, bucket, f"{prefix}/sha256/killed{i}", size)
        outside = f"{prefix}-other/sha256/not-ours"  # same bucket, another store's prefix: never touched
        _start_multipart(registry_backend.s3_endpoint, bucket, outside, 100)
        expected_multipart, incomplete_bytes = 2, 12000

    young = service.gc(grace_seconds=3600)
    assert young.removed_count == 0 and young.removed_bytes == 0

    time.sleep(1.1)  # S3 timestamps have one-second resolution
    old = time.time() - 7200
    os.utime(stale_spool, (old, old))
    dry = service.gc(grace_seconds=0.5, dry_run=True)
    report = service.gc(grace_seconds=0.5)
    for r in (dry, report):
        assert r.deleted == [orphan] and r.deleted_bytes == 1000
        assert (r.spool_files_deleted, r.spool_bytes) == (1, 3000)
        assert (r.temp_files_deleted, r.multipart_uploads_aborted) == (expected_temp, expected_multipart)
        assert r.incomplete_bytes == incomplete_bytes
        assert r.removed_count == 4 and r.removed_bytes == 1000 + 3000 + 12000
    assert not stale_spool.exists() and not service.blobs.exists(orphan)
    assert list(service.blobs.list_incomplete()) == []
    if registry_backend.s3_endpoint is not None:
        bucket = registry_backend.blobs_url.removeprefix("s3://").split("/", 1)[0]
        assert _open_multipart_keys(registry_backend.s3_endpoint, bucket) == {outside}
    assert service.gc(grace_seconds=0).removed_count == 0
