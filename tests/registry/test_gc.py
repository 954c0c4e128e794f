"""Garbage collection on both back ends: orphans go only after the grace period, referenced blobs never."""

from __future__ import annotations

import os
import time
from pathlib import Path

from loraplex.registry.service import RegistryService
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
