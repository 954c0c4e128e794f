"""A registry killed mid-upload leaves no visible version; gc removes what the crash left; uploads go on."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from loraplex.registry.blobs import open_blob_store
from loraplex.registry.client import RegistryClient
from loraplex.registry.errors import NotFound, Unavailable
from loraplex.registry.v1 import registry_service_pb2 as pb
from loraplex.registry.v1 import registry_service_pb2_grpc as pb_grpc
from tests.fixtures.hf import read_adapter
from tests.fixtures.procs import ServerProcess, backend_registry_args, run_cli, start_server


def gc_args(backend: object, spool: Path) -> list[str]:
    return ["registry", "gc", *backend_registry_args(backend)[2:], "--spool-dir", str(spool), "--gc-grace-seconds", "0"]


def start(backend: object, spool: Path, **env: str) -> ServerProcess:
    return start_server(backend_registry_args(backend), env={"LORAPLEX_SPOOL_DIR": str(spool), **env})


def blob_keys(backend: object) -> set[str]:
    store = open_blob_store(backend.blobs_url, backend.s3_endpoint)  # type: ignore[attr-defined]
    return {b.key for b in store.list("") if b.key.startswith("sha256/")}


async def prepare(address: str, tiny_models: dict[str, Path]) -> None:
    async with RegistryClient(address) as client:
        await client.register_base_model("tiny-llama", (tiny_models["llama"] / "config.json").read_text())
        await client.create_adapter("acme/fragile", "tiny-llama")


async def versions_of(address: str) -> list[int]:
    async with RegistryClient(address) as client:
        return [v.version for v in await client.list_versions("acme/fragile")]


async def test_crash_between_blob_and_metadata_leaves_only_an_orphan_blob(
    registry_backend: object, tmp_path: Path, tiny_models: dict[str, Path], tiny_adapters: dict[str, dict[str, Path]]
) -> None:
    spool = tmp_path / "spool"
    config, weights = read_adapter(tiny_adapters["llama"]["all-r8"])
    server = start(registry_backend, spool, LORAPLEX_FAILPOINT="after-blob-put")
    try:
        await prepare(server.address, tiny_models)
        async with RegistryClient(server.address) as client:
            try:
                await client.upload("acme/fragile", config, weights)
            except Unavailable:
                pass
            else:
                raise AssertionError("the failpoint should have killed the registry mid-upload")
        server.proc.wait(timeout=20)
        assert server.proc.returncode != 0
    finally:
        server.stop()
    assert len(blob_keys(registry_backend)) == 1  # the blob landed, its metadata did not

    server = start(registry_backend, spool)
    try:
        assert await versions_of(server.address) == []  # no PENDING/READY ghost
        async with RegistryClient(server.address) as client:
            with pytest.raises(NotFound):
                await client.resolve("acme/fragile")
        result = run_cli(gc_args(registry_backend, spool))
        assert result.returncode == 0, result.stderr
        # The crash left the blob and the staged upload file: both are removed and both are counted.
        assert "removed 2 item(s)" in result.stdout and "1 orphan blob(s)" in result.stdout
        assert "1 staged upload(s)" in result.stdout
        assert blob_keys(registry_backend) == set()
        async with RegistryClient(server.address) as client:
            version = await client.upload("acme/fragile", config, weights)
        assert version.version == 1
        assert len(blob_keys(registry_backend)) == 1
        # gc never removes a referenced blob, even with no grace period.
        assert run_cli(gc_args(registry_backend, spool)).returncode == 0
        assert len(blob_keys(registry_backend)) == 1
    finally:
        server.stop()


async def test_sigkill_mid_stream_leaves_nothing_visible(
    registry_backend: object, tmp_path: Path, tiny_models: dict[str, Path], tiny_adapters: dict[str, dict[str, Path]]
) -> None:
    spool = tmp_path / "spool"
    config, weights = read_adapter(tiny_adapters["llama"]["all-r64"])
    server = start(registry_backend, spool)
    half_sent = asyncio.Event()
    try:
        await prepare(server.address, tiny_models)

        async def slow_upload() -> AsyncIterator[pb.UploadAdapterVersionRequest]:
            yield pb.UploadAdapterVersionRequest(
                header=pb.UploadAdapterVersionRequest.Header(
                    adapter="acme/fragile", adapter_config_json=config, size_bytes=len(weights)
                )
            )
            yield pb.UploadAdapterVersionRequest(chunk=weights[: len(weights) // 2])
            half_sent.set()
            await asyncio.sleep(30)
            yield pb.UploadAdapterVersionRequest(chunk=weights[len(weights) // 2 :])

        channel = grpc.aio.insecure_channel(server.address)
        call = pb_grpc.AdapterRegistryServiceStub(channel).UploadAdapterVersion(slow_upload())
        await asyncio.wait_for(half_sent.wait(), 20)
        await asyncio.sleep(0.5)  # let the server write the first half to its spool file
        server.stop(signal.SIGKILL)
        try:
            await call
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE
        else:
            raise AssertionError("upload must fail when the server dies")
        await channel.close()
    finally:
        server.stop()
    assert any(spool.iterdir()), "the killed upload should have left its staged file behind"
    assert blob_keys(registry_backend) == set()

    server = start(registry_backend, spool)
    try:
        assert await versions_of(server.address) == []
        staged = sum(f.stat().st_size for f in spool.iterdir())
        result = run_cli([*gc_args(registry_backend, spool), "--json"])
        assert result.returncode == 0, result.stderr
        assert not any(spool.iterdir()), "gc should remove stale staged uploads"
        report = json.loads(result.stdout)  # and it says so: the staged half upload, with its bytes
        assert report["spool_files_deleted"] == 1 and report["spool_bytes"] == staged > 0
        assert report["removed_count"] == 1 and report["removed_bytes"] == staged
        async with RegistryClient(server.address) as client:
            assert (await client.upload("acme/fragile", config, weights)).version == 1
    finally:
        server.stop()
