"""The shared bootstrap: health, reflection, interceptor mapping, SIGTERM drain, structured logs."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from loraplex.registry.v1 import registry_service_pb2 as pb
from tests.fixtures.procs import start_server
from tests.services.conftest import RunningRegistry
from tests.services.rpc_helpers import expect_failure


async def test_health_and_reflection_list_every_service(registry: RunningRegistry) -> None:
    health = health_pb2_grpc.HealthStub(registry.channel)
    for service in ("", "loraplex.registry.v1.AdapterRegistryService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(registry.channel)

    async def ask() -> object:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names = set()
    async for reply in stub.ServerReflectionInfo(ask()):
        names |= {s.name for s in reply.list_services_response.service}
    assert names == {
        "loraplex.registry.v1.AdapterRegistryService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }


async def test_stop_flips_health_to_not_serving_first(registry: RunningRegistry) -> None:
    health = health_pb2_grpc.HealthStub(registry.channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
    first = await watch.read()
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    stopping = asyncio.create_task(registry.handle.stop(grace=2.0))
    second = await watch.read()
    assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
    await stopping


async def test_errors_carry_error_info_and_request_id(registry: RunningRegistry) -> None:
    failure = await expect_failure(
        registry.stub.GetAdapter(pb.GetAdapterRequest(name="acme/nope"), metadata=(("x-request-id", "abc123"),)),
        grpc.StatusCode.NOT_FOUND,
        "ADAPTER_NOT_FOUND",
    )
    assert "acme/nope" in failure.message


def test_sigterm_drains_and_logs_json(tmp_path: Path) -> None:
    server = start_server(
        [
            "registry",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--db",
            f"sqlite:///{tmp_path}/r.db",
            "--blobs",
            f"file://{tmp_path}/blobs",
        ]
    )
    try:
        channel = grpc.insecure_channel(server.address)
        grpc.channel_ready_future(channel).result(timeout=10)
        stub = pb.DESCRIPTOR  # noqa: F841 - descriptor import keeps the stubs loaded
        from loraplex.registry.v1 import registry_service_pb2_grpc as pb_grpc

        sync_stub = pb_grpc.AdapterRegistryServiceStub(channel)
        try:
            sync_stub.GetAdapter(pb.GetAdapterRequest(name="acme/missing"), metadata=(("x-request-id", "req-42"),))
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
        channel.close()
    finally:
        code = server.stop(signal.SIGTERM)
    assert code == 0, server.log()
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    done = [line for line in lines if line.get("msg") == "rpc done" and line.get("request_id") == "req-42"]
    assert done and done[0]["code"] == "NOT_FOUND" and done[0]["reason"] == "ADAPTER_NOT_FOUND"
    assert any(line.get("msg") == "shutting down" for line in lines)
