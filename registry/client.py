"""Async client for the registry, used by the engine's adapter fetcher and by the CLI.

Why it lives in ``registry/``: the engine imports the registry (never the reverse), and turning a received
status back into the same typed domain error (via its ErrorInfo reason) keeps failures typed end to end —
the engine can answer NOT_FOUND for an unknown adapter because the registry said exactly that.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2, status_pb2

from loraplex.registry.context import UNSET, request_id_var
from loraplex.registry.errors import LoraplexError, Unavailable, error_from_status
from loraplex.registry.v1 import registry_service_pb2 as pb
from loraplex.registry.v1 import registry_service_pb2_grpc as pb_grpc

CHUNK_BYTES = 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    # Reconnect quickly after a registry restart: callers fail fast with UNAVAILABLE meanwhile.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
T = TypeVar("T")


def error_from_rpc(exc: grpc.aio.AioRpcError, peer: str = "registry") -> LoraplexError:
    """The domain error behind a failed call (ErrorInfo reason when the server sent one)."""
    reason, metadata = "", {}
    trailers: Any = exc.trailing_metadata() or ()
    for key, value in trailers:
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    reason, metadata = info.reason, dict(info.metadata)
    code = exc.code()
    message = exc.details() or code.name
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and not reason:
        # gRPC's own text names the peer's address ("ipv4:10.0.0.5:50052: Connection refused"); a server that
        # relays this error to its callers must not pass that on, so it is ``detail`` (logged, not sent).
        return Unavailable(
            f"{peer} unavailable ({code.name})", reason=f"{peer.upper()}_UNAVAILABLE", detail=f"{peer}: {message}"
        )
    return error_from_status(code.name, message, reason, metadata)


@dataclass(frozen=True)
class DownloadedAdapter:
    version: pb.AdapterVersion
    weights: bytes


class RegistryClient:
    """One channel to the registry; every method raises ``LoraplexError`` subclasses on failure."""

    def __init__(self, address: str, token: str | None = None, timeout: float = 60.0):
        self.address = address
        self._token = token
        self._timeout = timeout
        self._channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.AdapterRegistryServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close(None)

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _metadata(self, token: str | None) -> Sequence[tuple[str, str]]:
        chosen = token if token is not None else self._token
        metadata = [("authorization", f"Bearer {chosen}")] if chosen else []
        request_id = request_id_var.get()
        if request_id != UNSET:  # inside a served call: the registry logs the caller's id too
            metadata.append(("x-request-id", request_id))
        return tuple(metadata)

    async def _call(
        self, method: Callable[..., Any], request: Any, token: str | None = None, timeout: float | None = None
    ) -> Any:
        try:
            return await method(request, metadata=self._metadata(token), timeout=timeout or self._timeout)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None

    # -- reads -------------------------------------------------------------------------------------------
    async def resolve(self, ref: str, token: str | None = None) -> pb.AdapterVersion:
        response = await self._call(self._stub.ResolveAdapter, pb.ResolveAdapterRequest(ref=ref), token)
        return response.adapter_version  # type: ignore[no-any-return]

    async def get_base_model(self, name: str, token: str | None = None) -> pb.BaseModel:
        response = await self._call(self._stub.GetBaseModel, pb.GetBaseModelRequest(name=name), token)
        return response.base_model  # type: ignore[no-any-return]

    async def list_base_models(self) -> list[pb.BaseModel]:
        return [m async for m in self._pages(self._stub.ListBaseModels, pb.ListBaseModelsRequest(), "base_models")]

    async def get_adapter(self, name: str) -> pb.Adapter:
        return (await self._call(self._stub.GetAdapter, pb.GetAdapterRequest(name=name))).adapter  # type: ignore[no-any-return]

    async def list_adapters(
        self, base_model: str = "", namespace: str = "", labels: dict[str, str] | None = None
    ) -> list[pb.Adapter]:
        request = pb.ListAdaptersRequest(base_model=base_model, namespace=namespace, labels=labels or {})
        return [a async for a in self._pages(self._stub.ListAdapters, request, "adapters")]

    async def list_versions(self, adapter: str) -> list[pb.AdapterVersion]:
        request = pb.ListAdapterVersionsRequest(adapter=adapter)
        return [v async for v in self._pages(self._stub.ListAdapterVersions, request, "adapter_versions")]

    async def _pages(self, method: Callable[..., Any], request: Any, field: str) -> AsyncIterator[Any]:
        while True:
            response = await self._call(method, request)
            for item in getattr(response, field):
                yield item
            if not response.next_page_token:
                return
            request.page_token = response.next_page_token

    async def download(
        self,
        ref: str,
        token: str | None = None,
        offset: int = 0,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> DownloadedAdapter:
        """Fetch a version's weights (from ``offset``) and check their size, and from 0 their sha256.

        Chunks are hashed as they arrive (no second pass) and copied straight into one buffer preallocated to
        the size the first message announces: ``BytesIO.getvalue()`` then hands that same object back, where
        keeping every chunk and joining them would fault in and copy the adapter's size twice more.
        """
        metadata = self._metadata(token)
        buffer: io.BytesIO | None = None
        hasher = hashlib.sha256()
        version: pb.AdapterVersion | None = None
        received = offset
        try:
            call = self._stub.DownloadAdapterVersion(
                pb.DownloadAdapterVersionRequest(ref=ref, offset=offset), metadata=metadata, timeout=self._timeout
            )
            async for message in call:
                if message.HasField("adapter_version"):
                    version = message.adapter_version
                if buffer is None:
                    expected = version.size_bytes - offset if version is not None else 0
                    buffer = io.BytesIO(bytes(max(expected, 0)))
                chunk = message.chunk  # every attribute read copies the bytes out of the message: read once
                buffer.write(chunk)
                hasher.update(chunk)
                received += len(chunk)
                if on_progress is not None and version is not None:
                    on_progress(received, version.size_bytes)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None
        if version is None or buffer is None:
            raise Unavailable(f"download of {ref} ended before its metadata", reason="DOWNLOAD_INCOMPLETE")
        if received != version.size_bytes:
            raise Unavailable(
                f"download of {ref} ended at byte {received} of {version.size_bytes}", reason="DOWNLOAD_INCOMPLETE"
            )
        if offset == 0 and hasher.hexdigest() != version.weights_sha256:
            raise Unavailable(f"download of {ref} failed its sha256 check", reason="DOWNLOAD_CORRUPT")
        return DownloadedAdapter(version=version, weights=buffer.getvalue())

    async def download_to(
        self,
        ref: str,
        path: Path,
        token: str | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> pb.AdapterVersion:
        """Stream a version's weights into ``path`` chunk by chunk, resuming after the bytes already there.

        Memory stays at one chunk whatever the adapter's size. The bytes already in ``path`` are taken as the
        first part of the same content (so pass an immutable ``name@sha256:…`` ref when resuming) and hashed
        first; the whole file's sha256 is checked at the end and a file that fails it is removed, so the next
        attempt starts over instead of resuming from bad bytes.
        """
        hasher = hashlib.sha256()
        offset = await asyncio.to_thread(_hash_into, hasher, path) if path.exists() else 0
        version: pb.AdapterVersion | None = None
        received = offset
        with path.open("ab") as out:
            try:
                call = self._stub.DownloadAdapterVersion(
                    pb.DownloadAdapterVersionRequest(ref=ref, offset=offset),
                    metadata=self._metadata(token),
                    timeout=self._timeout,
                )
                async for message in call:
                    if message.HasField("adapter_version"):
                        version = message.adapter_version
                    chunk = message.chunk
                    await asyncio.to_thread(_write_and_hash, out, hasher, chunk)
                    received += len(chunk)
                    if on_progress is not None and version is not None:
                        on_progress(received, version.size_bytes)
            except grpc.aio.AioRpcError as exc:
                raise error_from_rpc(exc) from None
        if version is None:
            raise Unavailable(f"download of {ref} ended before its metadata", reason="DOWNLOAD_INCOMPLETE")
        if received != version.size_bytes:
            raise Unavailable(
                f"download of {ref} ended at byte {received} of {version.size_bytes}", reason="DOWNLOAD_INCOMPLETE"
            )
        if hasher.hexdigest() != version.weights_sha256:
            path.unlink(missing_ok=True)
            raise Unavailable(
                f"download of {ref} failed its sha256 check (the partial file was removed; retry)",
                reason="DOWNLOAD_CORRUPT",
            )
        return version

    # -- writes ------------------------------------------------------------------------------------------
    async def register_base_model(self, name: str, config_json: str) -> pb.BaseModel:
        request = pb.RegisterBaseModelRequest(name=name, config_json=config_json)
        return (await self._call(self._stub.RegisterBaseModel, request)).base_model  # type: ignore[no-any-return]

    async def create_adapter(
        self, name: str, base_model: str, description: str = "", labels: dict[str, str] | None = None
    ) -> pb.Adapter:
        adapter = pb.Adapter(name=name, base_model=base_model, description=description, labels=labels or {})
        return (await self._call(self._stub.CreateAdapter, pb.CreateAdapterRequest(adapter=adapter))).adapter  # type: ignore[no-any-return]

    async def upload(
        self,
        adapter: str,
        config_json: str,
        weights: bytes | Path,
        request_id: str = "",
        expected_sha256: str = "",
        on_progress: Callable[[int, int], None] | None = None,
    ) -> pb.AdapterVersion:
        """Stream one version: header first, then ~1 MiB chunks (from memory or straight from a file)."""
        size = len(weights) if isinstance(weights, bytes) else weights.stat().st_size

        async def messages() -> AsyncIterator[pb.UploadAdapterVersionRequest]:
            header = pb.UploadAdapterVersionRequest.Header(
                adapter=adapter,
                adapter_config_json=config_json,
                size_bytes=size,
                expected_sha256=expected_sha256,
                request_id=request_id,
            )
            yield pb.UploadAdapterVersionRequest(header=header)
            sent = 0
            for chunk in _chunks(weights):
                sent += len(chunk)
                yield pb.UploadAdapterVersionRequest(chunk=chunk)
                if on_progress is not None:
                    on_progress(sent, size)

        timeout = self._timeout + size / (10 * 1024 * 1024)  # generous: ≥ 10 MiB/s on top of the base deadline
        try:
            response = await self._stub.UploadAdapterVersion(messages(), metadata=self._metadata(None), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None
        return response.adapter_version  # type: ignore[no-any-return]

    async def update_adapter(
        self,
        name: str,
        *,
        description: str | None = None,
        labels: dict[str, str] | None = None,
        etag: str = "",
    ) -> pb.Adapter:
        """Change the description and/or replace the labels (only what is not None); a stale ``etag`` is ABORTED."""
        adapter = pb.Adapter(name=name, etag=etag)
        paths = []
        if description is not None:
            adapter.description = description
            paths.append("description")
        if labels is not None:
            adapter.labels.update(labels)
            paths.append("labels")
        request = pb.UpdateAdapterRequest(adapter=adapter, update_mask=field_mask_pb2.FieldMask(paths=paths))
        return (await self._call(self._stub.UpdateAdapter, request)).adapter  # type: ignore[no-any-return]

    async def set_alias(self, adapter: str, alias: str, version: int) -> pb.Adapter:
        request = pb.SetAliasRequest(adapter=adapter, alias=alias, version=version)
        return (await self._call(self._stub.SetAlias, request)).adapter  # type: ignore[no-any-return]

    async def delete_alias(self, adapter: str, alias: str) -> pb.Adapter:
        request = pb.DeleteAliasRequest(adapter=adapter, alias=alias)
        return (await self._call(self._stub.DeleteAlias, request)).adapter  # type: ignore[no-any-return]

    async def delete_version(self, adapter: str, version: int) -> None:
        await self._call(
            self._stub.DeleteAdapterVersion, pb.DeleteAdapterVersionRequest(adapter=adapter, version=version)
        )

    async def delete_adapter(self, name: str, force: bool = False) -> None:
        await self._call(self._stub.DeleteAdapter, pb.DeleteAdapterRequest(name=name, force=force))


def _chunks(weights: bytes | Path) -> Iterator[bytes]:
    if isinstance(weights, bytes):
        return (weights[i : i + CHUNK_BYTES] for i in range(0, len(weights), CHUNK_BYTES))
    return _file_chunks(weights)


def _file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            yield chunk


def _hash_into(hasher: Any, path: Path) -> int:
    """Feed a file's bytes to ``hasher``; returns its size."""
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            hasher.update(chunk)
            size += len(chunk)
    return size


def _write_and_hash(out: Any, hasher: Any, chunk: bytes) -> None:
    out.write(chunk)
    hasher.update(chunk)
