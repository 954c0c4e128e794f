"""Blob storage for adapter weights: a small protocol with a local-directory and an S3 implementation.

Why content addressing (``sha256/<hex>``): the same weights uploaded twice are stored once, a put is idempotent
(exists -> skip), a half-finished upload can never be confused with a finished one, and garbage collection only
has to compare keys against the version rows. Metadata is written only after the blob is complete.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlparse

from loraplex.registry.errors import InvalidArgument, NotFound, Unavailable

CHUNK_SIZE = 1024 * 1024
MULTIPART_THRESHOLD = 8 * 1024 * 1024
_TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class BlobInfo:
    key: str
    size: int
    modified: datetime


@dataclass(frozen=True)
class IncompleteWrite:
    """Bytes an interrupted write left behind: a local ``.tmp-*`` file or an S3 multipart upload never completed.

    ``name`` is the file path or object key, ``handle`` what removing it needs (path or upload id), ``modified``
    its last sign of life (a file's mtime; an upload's start or its newest part, whichever is later).
    """

    kind: str  # "temp-file" | "multipart-upload"
    name: str
    handle: str
    size: int
    modified: datetime


def blob_key_for(sha256_hex: str) -> str:
    """The content-addressed key of a blob whose bytes hash to ``sha256_hex``."""
    return f"sha256/{sha256_hex}"


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in key:
        raise InvalidArgument(f"invalid blob key {key!r}")
    return key


@runtime_checkable
class BlobStore(Protocol):
    """Where weights live. Implementations must be thread-safe; ``put_file`` must be atomic and idempotent."""

    def put_file(self, key: str, path: Path) -> None: ...

    def open_range(self, key: str, offset: int = 0) -> Iterator[bytes]: ...

    def size(self, key: str) -> int: ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...

    def list(self, prefix: str = "") -> Iterator[BlobInfo]: ...

    def list_incomplete(self) -> Iterator[IncompleteWrite]:
        """What interrupted writes left under this store (gc removes the old ones: S3 bills multipart parts)."""
        ...

    def discard_incomplete(self, item: IncompleteWrite) -> None: ...


class LocalBlobStore:
    """Blobs as files under ``root``; writes go to a temp file in the same directory, fsync, then os.replace."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put_file(self, key: str, path: Path) -> None:
        final = self._path(key)
        if final.exists():
            os.utime(final)  # refresh: a concurrent gc must see this blob as recent again
            return
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=final.parent)
        try:
            with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
                while chunk := src.read(CHUNK_SIZE):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp_name, final)
            dir_fd = os.open(final.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise

    def open_range(self, key: str, offset: int = 0) -> Iterator[bytes]:
        path = self._path(key)
        try:
            handle = open(path, "rb")  # noqa: SIM115 - closed by the generator below
        except FileNotFoundError:
            raise NotFound(f"blob {key!r} not found", reason="BLOB_NOT_FOUND") from None
        return _file_chunks(handle, offset)

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise NotFound(f"blob {key!r} not found", reason="BLOB_NOT_FOUND") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        for path in sorted(self.root.rglob("*")):
            if not path.is_file() or path.name.startswith(_TMP_PREFIX):
                continue
            key = path.relative_to(self.root).as_posix()
            if key.startswith(prefix):
                stat = path.stat()
                yield BlobInfo(key, stat.st_size, datetime.fromtimestamp(stat.st_mtime, UTC))

    def list_incomplete(self) -> Iterator[IncompleteWrite]:
        """``.tmp-*`` files of ``put_file`` calls that never reached ``os.replace`` (a killed process)."""
        for path in sorted(self.root.rglob(f"{_TMP_PREFIX}*")):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            if path.is_file():
                modified = datetime.fromtimestamp(stat.st_mtime, UTC)
                yield IncompleteWrite("temp-file", str(path), str(path), stat.st_size, modified)

    def discard_incomplete(self, item: IncompleteWrite) -> None:
        path = Path(item.handle)
        if path.name.startswith(_TMP_PREFIX) and path.resolve().is_relative_to(self.root):
            path.unlink(missing_ok=True)


def _file_chunks(handle: Any, offset: int) -> Iterator[bytes]:
    with handle:
        handle.seek(offset)
        while chunk := handle.read(CHUNK_SIZE):
            yield chunk


class S3BlobStore:
    """Blobs as objects under ``s3://bucket/prefix``; credentials come from the standard AWS environment."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None, **client_kwargs: Any) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        config = Config(
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"max_attempts": 5, "mode": "standard"},
            max_pool_connections=32,
        )
        self._client: Any = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url, config=config, **client_kwargs
        )
        self._transfer = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD
        )

    def _object(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        # botocore's texts name the endpoint URL, bucket and key: they go to ``detail`` (the server log) only.
        try:
            return fn(*args, **kwargs)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                raise NotFound("blob not found", reason="BLOB_NOT_FOUND", detail=str(exc)) from None
            raise Unavailable(f"blob store error ({code or 'unknown'})", detail=str(exc)) from exc
        except BotoCoreError as exc:
            raise Unavailable("blob store unreachable", detail=str(exc)) from exc

    def put_file(self, key: str, path: Path) -> None:
        if self.exists(key):
            # Copy onto itself to refresh LastModified: a concurrent gc must see this blob as recent again.
            self._call(
                self._client.copy_object,
                Bucket=self.bucket,
                Key=self._object(key),
                CopySource={"Bucket": self.bucket, "Key": self._object(key)},
                MetadataDirective="REPLACE",
            )
            return
        self._call(self._client.upload_file, str(path), self.bucket, self._object(key), Config=self._transfer)

    def open_range(self, key: str, offset: int = 0) -> Iterator[bytes]:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self._object(key)}
        if offset > 0:
            kwargs["Range"] = f"bytes={offset}-"
        response = self._call(self._client.get_object, **kwargs)
        return _stream_chunks(response["Body"])

    def size(self, key: str) -> int:
        head = self._call(self._client.head_object, Bucket=self.bucket, Key=self._object(key))
        return int(head["ContentLength"])

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except NotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        self._call(self._client.delete_object, Bucket=self.bucket, Key=self._object(key))

    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        if ".." in prefix.split("/") or prefix.startswith("/"):
            raise InvalidArgument(f"invalid blob prefix {prefix!r}")
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        paginator = self._client.get_paginator("list_objects_v2")
        pages = self._call(lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=full)))
        for page in pages:
            for obj in page.get("Contents", []):
                yield BlobInfo(obj["Key"][strip:], int(obj["Size"]), obj["LastModified"].astimezone(UTC))

    def list_incomplete(self) -> Iterator[IncompleteWrite]:
        """Multipart uploads under this store's prefix that were started and never completed or aborted."""
        prefix = f"{self.prefix}/" if self.prefix else ""
        paginator = self._client.get_paginator("list_multipart_uploads")
        pages = self._call(lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=prefix)))
        for page in pages:
            for upload in page.get("Uploads", []):
                key, upload_id = upload["Key"], upload["UploadId"]
                size, last_part = self._parts(key, upload_id)
                modified = max(upload["Initiated"].astimezone(UTC), last_part)
                yield IncompleteWrite("multipart-upload", key, upload_id, size, modified)

    def _parts(self, key: str, upload_id: str) -> tuple[int, datetime]:
        """(bytes uploaded so far, time of the newest part): an upload still receiving parts is alive."""
        paginator = self._client.get_paginator("list_parts")
        oldest = datetime.min.replace(tzinfo=UTC)
        try:
            pages = self._call(lambda: list(paginator.paginate(Bucket=self.bucket, Key=key, UploadId=upload_id)))
        except Unavailable as exc:
            if _s3_error_code(exc.__cause__) != "NoSuchUpload":
                raise
            return 0, oldest  # completed or aborted meanwhile: nothing left to count
        parts = [part for page in pages for part in page.get("Parts", [])]
        newest = max((part["LastModified"].astimezone(UTC) for part in parts), default=oldest)
        return sum(int(part["Size"]) for part in parts), newest

    def discard_incomplete(self, item: IncompleteWrite) -> None:
        try:
            self._call(self._client.abort_multipart_upload, Bucket=self.bucket, Key=item.name, UploadId=item.handle)
        except Unavailable as exc:
            if _s3_error_code(exc.__cause__) != "NoSuchUpload":  # completed or aborted meanwhile: nothing to do
                raise

    def create_bucket_if_missing(self) -> None:
        """For tests and demos only: the service never creates buckets on its own."""
        create_bucket_if_missing(self._client, self.bucket)


def create_bucket_if_missing(client: Any, bucket: str) -> None:
    from botocore.exceptions import ClientError

    try:
        client.head_bucket(Bucket=bucket)
    except ClientError:
        region = client.meta.region_name
        if region and region != "us-east-1":
            client.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": region})
        else:
            client.create_bucket(Bucket=bucket)


def _s3_error_code(exc: BaseException | None) -> str:
    response = getattr(exc, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


def _stream_chunks(body: Any) -> Iterator[bytes]:
    """Chunks of a GET body; a connection lost mid-stream surfaces as ``Unavailable``, like a failed GET."""
    from botocore.exceptions import BotoCoreError
    from urllib3.exceptions import HTTPError

    try:
        while chunk := body.read(CHUNK_SIZE):
            yield chunk
    except (BotoCoreError, HTTPError, OSError) as exc:
        raise Unavailable("blob store read failed", detail=str(exc)) from exc
    finally:
        body.close()


def open_blob_store(url: str, s3_endpoint: str | None = None) -> BlobStore:
    """``file:///abs/dir``, ``file://./rel/dir`` or ``s3://bucket/prefix`` -> a blob store (local dir created)."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        path = parsed.path if parsed.netloc in ("", "localhost") else parsed.netloc + parsed.path
        if not path:
            raise InvalidArgument(f"blob store URL {url!r} has no path")
        return LocalBlobStore(Path(path))
    if parsed.scheme == "s3":
        if len(parsed.netloc) < 3:
            raise InvalidArgument(f"blob store URL {url!r} needs a bucket name")
        return S3BlobStore(parsed.netloc, parsed.path.strip("/"), endpoint_url=s3_endpoint)
    raise InvalidArgument(f"unsupported blob store URL {url!r}: expected file:// or s3://")


def new_temp_name() -> str:
    """A collision-free file name for spool files."""
    return f"{_TMP_PREFIX}{uuid.uuid4().hex}"
