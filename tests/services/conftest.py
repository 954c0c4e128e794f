"""In-process registry servers on loopback for RPC tests, one per test, on both storage back ends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from loraplex.registry.client import RegistryClient
from loraplex.registry.v1 import registry_service_pb2_grpc as pb_grpc
from loraplex.services.registry_app import start_registry
from loraplex.services.server import ServerHandle
from loraplex.services.settings import RegistrySettings


@dataclass
class RunningRegistry:
    handle: ServerHandle
    settings: RegistrySettings
    channel: grpc.aio.Channel
    stub: pb_grpc.AdapterRegistryServiceStub
    client: RegistryClient

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.handle.port}"


def registry_settings(backend: object, tmp_path: Path, **overrides: object) -> RegistrySettings:
    values = dict(
        listen="127.0.0.1:0",
        db=backend.db_url,  # type: ignore[attr-defined]
        blobs=backend.blobs_url,  # type: ignore[attr-defined]
        s3_endpoint=backend.s3_endpoint,  # type: ignore[attr-defined]
        spool_dir=str(tmp_path / "spool"),
        max_adapter_bytes=64 * 1024 * 1024,
    )
    values.update(overrides)
    return RegistrySettings(**values)  # type: ignore[arg-type]


async def open_registry(settings: RegistrySettings, token: str | None = None) -> RunningRegistry:
    handle = await start_registry(settings)
    address = f"127.0.0.1:{handle.port}"
    channel = grpc.aio.insecure_channel(address)
    return RunningRegistry(
        handle=handle,
        settings=settings,
        channel=channel,
        stub=pb_grpc.AdapterRegistryServiceStub(channel),
        client=RegistryClient(address, token),
    )


async def close_registry(running: RunningRegistry) -> None:
    await running.client.close()
    await running.channel.close()
    await running.handle.stop(grace=1.0)


@pytest.fixture
async def registry(registry_backend: object, tmp_path: Path) -> AsyncIterator[RunningRegistry]:
    running = await open_registry(registry_settings(registry_backend, tmp_path))
    try:
        yield running
    finally:
        await close_registry(running)
