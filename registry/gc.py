"""Garbage collection of orphan blobs, stale spool files and what interrupted writes left in the blob store.

Why a grace period: blobs are written before their version row (blob first, then metadata), so a blob with no
row may simply belong to an upload that is committing right now. Only blobs unreferenced AND older than the
grace period go; the blob store refreshes a blob's modification time when an upload re-puts it, the reference
set is read after the listing, and each candidate's age is re-checked just before it is deleted. The same
grace protects writes in progress: a ``.tmp-*`` file or an S3 multipart upload is removed (aborted) only once its
last sign of life (the file's mtime; the upload's start or newest part) is older than the grace period. S3 bills
the parts of an incomplete multipart upload until it is aborted, so a killed registry must not leave them forever.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from loraplex.registry.blobs import BlobStore
from loraplex.registry.entities import GcReport
from loraplex.registry.errors import NotFound
from loraplex.registry.store import SqlMetadataStore

BLOB_PREFIX = "sha256/"
SPOOL_PREFIX = "upload-"


def collect_garbage(
    store: SqlMetadataStore,
    blobs: BlobStore,
    spool_dir: Path | None,
    grace_seconds: float,
    dry_run: bool = False,
) -> GcReport:
    """Delete unreferenced ``sha256/`` blobs older than ``grace_seconds`` and spool files just as old."""
    cutoff = datetime.now(UTC) - timedelta(seconds=grace_seconds)
    listed = list(blobs.list(BLOB_PREFIX))
    referenced_keys = store.referenced_blob_keys()  # read AFTER listing: a row committed meanwhile is seen
    deleted: list[str] = []
    kept_recent = referenced = deleted_bytes = 0
    for info in listed:
        if info.key in referenced_keys:
            referenced += 1
            continue
        if info.modified > cutoff:
            kept_recent += 1
            continue
        if not dry_run:
            if _modified_since(blobs, info.key, cutoff):
                kept_recent += 1
                continue
            blobs.delete(info.key)
        deleted.append(info.key)
        deleted_bytes += info.size
    spool_files, spool_bytes = _clean_spool(spool_dir, grace_seconds, dry_run)
    temp_files = multipart_uploads = incomplete_bytes = 0
    for item in list(blobs.list_incomplete()):
        if item.modified > cutoff:
            continue
        if not dry_run:
            blobs.discard_incomplete(item)
        incomplete_bytes += item.size
        if item.kind == "multipart-upload":
            multipart_uploads += 1
        else:
            temp_files += 1
    return GcReport(
        deleted=deleted,
        kept_recent=kept_recent,
        referenced=referenced,
        spool_files_deleted=spool_files,
        deleted_bytes=deleted_bytes,
        spool_bytes=spool_bytes,
        temp_files_deleted=temp_files,
        multipart_uploads_aborted=multipart_uploads,
        incomplete_bytes=incomplete_bytes,
    )


def _modified_since(blobs: BlobStore, key: str, cutoff: datetime) -> bool:
    """Re-read one blob's modification time (an upload may have refreshed it since the listing)."""
    for info in blobs.list(key):
        if info.key == key:
            recent: bool = info.modified > cutoff
            return recent
    return False


def _clean_spool(spool_dir: Path | None, grace_seconds: float, dry_run: bool) -> tuple[int, int]:
    """(files, bytes) of staged uploads older than the grace period, removed unless ``dry_run``."""
    if spool_dir is None or not spool_dir.is_dir():
        return 0, 0
    cutoff = time.time() - grace_seconds
    count = size = 0
    for path in spool_dir.glob(f"{SPOOL_PREFIX}*"):
        try:
            stat = path.stat()
            if path.is_file() and stat.st_mtime < cutoff:
                if not dry_run:
                    path.unlink(missing_ok=True)
                count += 1
                size += stat.st_size
        except (FileNotFoundError, NotFound):
            continue
    return count, size
