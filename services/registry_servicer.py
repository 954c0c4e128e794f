"""gRPC face of the registry: authorize, translate proto ↔ domain, call ``RegistryService`` off the loop.

Thin by design: every rule about names, shapes, versions and storage lives in ``loraplex.registry``; this
module only checks who may call, streams bytes, and converts messages. Blocking store/blob calls run in worker
threads so one slow upload never stalls other RPCs.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc

from loraplex.registry.errors import InvalidArgument
from loraplex.registry.refs import parse_ref, validate_adapter_name
from loraplex.registry.service import RegistryService, UploadPlan
from loraplex.registry.v1 import registry_service_pb2 as pb
from loraplex.registry.v1 import registry_service_pb2_grpc as pb_grpc
from loraplex.registry.weights_check import CheckedWeights
from loraplex.services.auth import principal_var, require, require_admin
from loraplex.services.convert import adapter_to_pb, base_model_to_pb, version_to_pb

Context = grpc.aio.ServicerContext[Any, Any]
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AdapterRegistryService"].full_name
# Chunks a download may read ahead of the gRPC send: enough to keep the blob read and the send overlapping,
# small enough that a slow client pins only a few MiB of server memory per stream.
READ_AHEAD_CHUNKS = 4


def _namespace_of(name: str) -> str:
    validate_adapter_name(name)
    return name.split("/", 1)[0]


def _namespace_of_ref(ref: str) -> str:
    return parse_ref(ref).namespace


async def read_ahead(chunks: Iterator[bytes], depth: int = READ_AHEAD_CHUNKS) -> AsyncIterator[bytes]:
    """Yield ``chunks`` on the event loop while one worker thread reads up to ``depth`` chunks ahead.

    Why: a blocking read per ``asyncio.to_thread`` hop serialises the blob read with the gRPC send (neither
    runs while the other waits) and pays an executor round trip per chunk. One reader thread per stream keeps
    S3/disk reads flowing while the previous chunk is on the wire; the bounded window (a semaphore the
    consumer releases) keeps memory flat against slow clients. A dedicated thread rather than the default
    executor: a long download must not occupy one of the few workers every other RPC's store call needs.
    The iterator is consumed and closed in the reader thread only (generators are not thread-safe), and a
    consumer that stops early (client cancelled) makes the reader stop after its current read.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()
    window = threading.Semaphore(depth)
    stopped = threading.Event()

    def hand_over(item: bytes | BaseException | None) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            stopped.set()

    def read() -> None:
        try:
            for chunk in chunks:
                window.acquire()
                if stopped.is_set():
                    return
                hand_over(chunk)
            hand_over(None)
        except BaseException as exc:  # re-raised on the event loop by the consumer: it must not wait forever
            hand_over(exc)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    threading.Thread(target=read, name="registry-download", daemon=True).start()
    try:
        while (item := await queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            window.release()
            yield item
    finally:
        stopped.set()
        window.release()  # a reader blocked on a full window wakes, sees ``stopped`` and closes the source
        window.release()  # unblock a reader waiting for room so it can see ``stopped`` and exit


class RegistryServicer(pb_grpc.AdapterRegistryServiceServicer):
    def __init__(self, service: RegistryService):
        self._svc = service

    # -- base models ---------------------------------------------------------------------------------
    async def RegisterBaseModel(
        self, request: pb.RegisterBaseModelRequest, context: Context
    ) -> pb.RegisterBaseModelResponse:
        require_admin()
        model = await asyncio.to_thread(self._svc.register_base_model, request.name, request.config_json)
        return pb.RegisterBaseModelResponse(base_model=base_model_to_pb(model))

    async def GetBaseModel(self, request: pb.GetBaseModelRequest, context: Context) -> pb.GetBaseModelResponse:
        model = await asyncio.to_thread(self._svc.get_base_model, request.name)
        return pb.GetBaseModelResponse(base_model=base_model_to_pb(model))

    async def ListBaseModels(self, request: pb.ListBaseModelsRequest, context: Context) -> pb.ListBaseModelsResponse:
        page = await asyncio.to_thread(self._svc.list_base_models, request.page_size, request.page_token)
        return pb.ListBaseModelsResponse(
            base_models=[base_model_to_pb(m) for m in page.items], next_page_token=page.next_page_token
        )

    # -- adapters ------------------------------------------------------------------------------------
    async def CreateAdapter(self, request: pb.CreateAdapterRequest, context: Context) -> pb.CreateAdapterResponse:
        a = request.adapter
        require(_namespace_of(a.name), "write")
        created = await asyncio.to_thread(self._svc.create_adapter, a.name, a.base_model, a.description, dict(a.labels))
        return pb.CreateAdapterResponse(adapter=adapter_to_pb(created))

    async def GetAdapter(self, request: pb.GetAdapterRequest, context: Context) -> pb.GetAdapterResponse:
        require(_namespace_of(request.name), "read")
        adapter = await asyncio.to_thread(self._svc.get_adapter, request.name)
        return pb.GetAdapterResponse(adapter=adapter_to_pb(adapter))

    async def ListAdapters(self, request: pb.ListAdaptersRequest, context: Context) -> pb.ListAdaptersResponse:
        namespaces: frozenset[str] | None
        if request.namespace:
            require(request.namespace, "read")
            namespaces = frozenset({request.namespace})
        else:
            namespaces = principal_var.get().readable_namespaces
        page = await asyncio.to_thread(
            self._svc.list_adapters,
            request.page_size,
            request.page_token,
            request.base_model or None,
            dict(request.labels) or None,
            namespaces,
        )
        return pb.ListAdaptersResponse(
            adapters=[adapter_to_pb(a) for a in page.items], next_page_token=page.next_page_token
        )

    async def UpdateAdapter(self, request: pb.UpdateAdapterRequest, context: Context) -> pb.UpdateAdapterResponse:
        a = request.adapter
        require(_namespace_of(a.name), "write")
        paths = list(request.update_mask.paths)
        if not paths:
            raise InvalidArgument("update_mask must name at least one of: description, labels")
        updated = await asyncio.to_thread(
            lambda: self._svc.update_adapter(
                a.name, paths=paths, description=a.description, labels=dict(a.labels), etag=a.etag
            )
        )
        return pb.UpdateAdapterResponse(adapter=adapter_to_pb(updated))

    async def DeleteAdapter(self, request: pb.DeleteAdapterRequest, context: Context) -> pb.DeleteAdapterResponse:
        require(_namespace_of(request.name), "write")
        await asyncio.to_thread(lambda: self._svc.delete_adapter(request.name, etag=request.etag, force=request.force))
        return pb.DeleteAdapterResponse()

    # -- versions ------------------------------------------------------------------------------------
    async def UploadAdapterVersion(
        self, request_iterator: AsyncIterator[pb.UploadAdapterVersionRequest], context: Context
    ) -> pb.UploadAdapterVersionResponse:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("content") != "header":
            raise InvalidArgument("the first upload message must be the header", reason="UPLOAD_PROTOCOL")
        header = first.header
        require(_namespace_of(header.adapter), "write")
        plan = await asyncio.to_thread(
            self._svc.begin_upload,
            header.adapter,
            header.adapter_config_json,
            header.size_bytes,
            header.expected_sha256,
            header.request_id,
        )
        if plan.settled and plan.existing is not None:  # a retry that declared the existing content's sha256
            return pb.UploadAdapterVersionResponse(adapter_version=version_to_pb(plan.existing))
        spool = self._svc.new_spool_file()
        try:
            digest, checked = await self._receive(request_iterator, spool, plan)
            version = await asyncio.to_thread(self._svc.finish_upload, plan, spool, digest, checked)
        finally:
            spool.unlink(missing_ok=True)
        return pb.UploadAdapterVersionResponse(adapter_version=version_to_pb(version))

    @staticmethod
    async def _receive(
        request_iterator: AsyncIterator[pb.UploadAdapterVersionRequest], spool: Path, plan: UploadPlan
    ) -> tuple[str, CheckedWeights]:
        """Stream chunks to the spool file, hashing and checking them as they come (header rules, finite
        weights); stop at the first protocol, size or content violation, before the rest is read."""
        declared = plan.size_bytes
        hasher = hashlib.sha256()
        checks = plan.weights_stream()
        received = 0
        with spool.open("wb") as out:
            async for message in request_iterator:
                if message.WhichOneof("content") != "chunk":
                    raise InvalidArgument("header sent twice: only chunks may follow it", reason="UPLOAD_PROTOCOL")
                chunk = message.chunk  # every attribute read copies the bytes out of the message: read once
                received += len(chunk)
                if received > declared:
                    raise InvalidArgument(f"received more than the declared {declared} bytes", reason="SIZE_MISMATCH")
                hasher.update(chunk)
                checks.feed(chunk)
                out.write(chunk)
            out.flush()
            # fsync waits for the disk (a 1 GB spool: seconds): never on the event loop every RPC shares.
            await asyncio.to_thread(os.fsync, out.fileno())
        if received != declared:
            raise InvalidArgument(f"upload ended after {received} of {declared} declared bytes", reason="SIZE_MISMATCH")
        return hasher.hexdigest(), checks.finish()

    async def GetAdapterVersion(
        self, request: pb.GetAdapterVersionRequest, context: Context
    ) -> pb.GetAdapterVersionResponse:
        require(_namespace_of(request.adapter), "read")
        version = await asyncio.to_thread(self._svc.get_version, request.adapter, request.version)
        return pb.GetAdapterVersionResponse(adapter_version=version_to_pb(version))

    async def ListAdapterVersions(
        self, request: pb.ListAdapterVersionsRequest, context: Context
    ) -> pb.ListAdapterVersionsResponse:
        require(_namespace_of(request.adapter), "read")
        page = await asyncio.to_thread(self._svc.list_versions, request.adapter, request.page_size, request.page_token)
        return pb.ListAdapterVersionsResponse(
            adapter_versions=[version_to_pb(v) for v in page.items], next_page_token=page.next_page_token
        )

    async def DeleteAdapterVersion(
        self, request: pb.DeleteAdapterVersionRequest, context: Context
    ) -> pb.DeleteAdapterVersionResponse:
        require(_namespace_of(request.adapter), "write")
        await asyncio.to_thread(self._svc.delete_version, request.adapter, request.version)
        return pb.DeleteAdapterVersionResponse()

    async def DownloadAdapterVersion(
        self, request: pb.DownloadAdapterVersionRequest, context: Context
    ) -> AsyncIterator[pb.DownloadAdapterVersionResponse]:
        require(_namespace_of_ref(request.ref), "read")
        version, chunks = await asyncio.to_thread(self._svc.open_download, request.ref, request.offset)
        offset = request.offset
        first = True
        async for chunk in read_ahead(chunks):
            yield pb.DownloadAdapterVersionResponse(
                adapter_version=version_to_pb(version) if first else None, offset=offset, chunk=chunk
            )
            first = False
            offset += len(chunk)
        if first:  # nothing left to send (offset == size): still tell the caller what it asked for
            yield pb.DownloadAdapterVersionResponse(adapter_version=version_to_pb(version), offset=offset)

    # -- aliases and resolution ----------------------------------------------------------------------
    async def SetAlias(self, request: pb.SetAliasRequest, context: Context) -> pb.SetAliasResponse:
        require(_namespace_of(request.adapter), "write")
        adapter = await asyncio.to_thread(self._svc.set_alias, request.adapter, request.alias, request.version)
        return pb.SetAliasResponse(adapter=adapter_to_pb(adapter))

    async def DeleteAlias(self, request: pb.DeleteAliasRequest, context: Context) -> pb.DeleteAliasResponse:
        require(_namespace_of(request.adapter), "write")
        adapter = await asyncio.to_thread(self._svc.delete_alias, request.adapter, request.alias)
        return pb.DeleteAliasResponse(adapter=adapter_to_pb(adapter))

    async def ResolveAdapter(self, request: pb.ResolveAdapterRequest, context: Context) -> pb.ResolveAdapterResponse:
        require(_namespace_of_ref(request.ref), "read")
        version = await asyncio.to_thread(self._svc.resolve, request.ref)
        return pb.ResolveAdapterResponse(adapter_version=version_to_pb(version))
