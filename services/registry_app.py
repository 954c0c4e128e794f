"""Builds and runs the registry from ``RegistrySettings``: migrate → stores → servicer → server."""

from __future__ import annotations

import logging
from pathlib import Path

from loraplex.registry.blobs import open_blob_store
from loraplex.registry.migrations import migrate
from loraplex.registry.service import RegistryLimits, RegistryService
from loraplex.registry.store import SqlMetadataStore
from loraplex.registry.v1 import registry_service_pb2_grpc as pb_grpc
from loraplex.services.auth import TokenAuthority
from loraplex.services.registry_servicer import SERVICE_NAME, RegistryServicer
from loraplex.services.server import ServerHandle, ServiceBinding, run_until_signal, start_server
from loraplex.services.settings import RegistrySettings

log = logging.getLogger("loraplex.registry")


def _ensure_sqlite_parent(db_url: str) -> None:
    """Embedded default: create the folder of a relative/absolute SQLite file so a fresh checkout just works."""
    prefix = "sqlite:///"
    if db_url.startswith(prefix) and db_url[len(prefix) :] not in ("", ":memory:"):
        Path(db_url[len(prefix) :]).parent.mkdir(parents=True, exist_ok=True)


def build_service(settings: RegistrySettings) -> RegistryService:
    _ensure_sqlite_parent(settings.db)
    migrate(settings.db)
    store = SqlMetadataStore(settings.db)
    blobs = open_blob_store(settings.blobs, settings.s3_endpoint)
    limits = RegistryLimits(max_rank=settings.max_rank, max_adapter_bytes=settings.max_adapter_bytes)
    spool = Path(settings.spool_dir) if settings.spool_dir else None
    return RegistryService(store, blobs, limits, spool_dir=spool)


async def start_registry(settings: RegistrySettings) -> ServerHandle:
    service = build_service(settings)
    authority = TokenAuthority.from_file(settings.tokens_file)
    binding = ServiceBinding(
        SERVICE_NAME, RegistryServicer(service), pb_grpc.add_AdapterRegistryServiceServicer_to_server
    )
    handle = await start_server(
        [binding], settings.listen, authority, insecure=settings.insecure, drain_seconds=settings.drain_seconds
    )
    log.info("registry listening", extra={"port": handle.port, "listen": settings.listen, "auth": authority.enabled})
    return handle


async def serve_registry(settings: RegistrySettings) -> None:
    handle = await start_registry(settings)
    # A line on stdout that scripts and tests wait for (the port is real even with ":0").
    print(f"loraplex registry listening on port {handle.port}", flush=True)
    await run_until_signal(handle)
