"""The engine rides out a registry outage for cached adapters; and the stack works on PostgreSQL + S3 too."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import grpc
import pytest
import torch

from tests.e2e.stack import (
    collect,
    engine_args,
    engine_stub,
    push,
    register,
    registry_args,
    start_stack,
    stream_request,
)
from tests.engine.helpers import peft_model, until_eos
from tests.fixtures.procs import start_server
from tests.services.rpc_helpers import expect_failure


def test_registry_outage_keeps_cached_adapters_serving(
    tiny_models: dict[str, Path], tiny_adapters: dict[str, dict[str, Path]], tmp_path: Path
) -> None:
    model = tiny_models["llama"]
    reg_args = registry_args(f"sqlite:///{tmp_path}/r.db", f"file://{tmp_path}/blobs")
    registry = start_server(reg_args)
    port = registry.port
    engine = None
    try:
        asyncio.run(register(registry.address, model))
        for name in ("qv-r4", "mlp-r32"):
            asyncio.run(push(registry.address, f"acme/{name}", tiny_adapters["llama"][name]))
        engine = start_server(engine_args(model, registry.address, "--alias-ttl-seconds", "0.5"), timeout=180)

        async def scenario_before() -> list[int]:
            channel, stub = engine_stub(engine.address)
            async with channel:
                return (await collect(stub, stream_request("acme/qv-r4", [4, 5, 6]))).token_ids

        warm_tokens = asyncio.run(scenario_before())
        registry.stop(signal.SIGKILL)

        async def during_outage() -> None:
            await asyncio.sleep(1.0)  # past the alias TTL: the cached resolution is now stale but still usable
            channel, stub = engine_stub(engine.address)
            async with channel:
                again = await collect(stub, stream_request("acme/qv-r4", [4, 5, 6]))
                assert again.token_ids == warm_tokens

                async def cold() -> None:
                    async for _ in stub.GenerateStream(stream_request("acme/mlp-r32", [4, 5, 6])):
                        pass

                await expect_failure(cold(), grpc.StatusCode.UNAVAILABLE)

        asyncio.run(during_outage())
        registry = start_server([*reg_args[:2], "--listen", f"127.0.0.1:{port}", *reg_args[4:]])

        async def after_recovery() -> None:
            channel, stub = engine_stub(engine.address)
            async with channel:
                for _ in range(50):  # the engine's channel reconnects with a short backoff
                    try:
                        got = await collect(stub, stream_request("acme/mlp-r32", [4, 5, 6]))
                        break
                    except grpc.aio.AioRpcError as exc:
                        assert exc.code() == grpc.StatusCode.UNAVAILABLE
                        await asyncio.sleep(0.2)
                else:
                    raise AssertionError("engine never reached the restarted registry")
                assert got.adapter is not None and got.adapter.adapter == "acme/mlp-r32" and got.token_ids

        asyncio.run(after_recovery())
    finally:
        if engine is not None:
            engine.stop()
        registry.stop()


def test_postgres_and_s3_backed_stack_matches_peft(
    registry_backend: object, tiny_models: dict[str, Path], tiny_adapters: dict[str, dict[str, Path]], tmp_path: Path
) -> None:
    if getattr(registry_backend, "s3_endpoint", None) is None:
        pytest.skip("the SQLite + local-folder stack is covered by test_engine_service.py")
    model = tiny_models["llama"]
    zoo = {name: tiny_adapters["llama"][name] for name in ("attn-r16-rs", "pattern-r8", "embed-head-r8")}
    stack = start_stack(model, tmp_path, backend=registry_backend)
    try:
        for name, folder in zoo.items():
            asyncio.run(push(stack.registry.address, f"acme/{name}", folder))
        prompt = [7, 8, 9, 10]
        oracle = peft_model(model, zoo)
        names = list(zoo)
        with torch.no_grad():
            out = oracle.generate(
                torch.tensor([prompt] * len(names)), adapter_names=names, do_sample=False, max_new_tokens=8
            )
        want = [until_eos(row[len(prompt) :].tolist(), 1) for row in out]

        async def run_all() -> list[list[int]]:
            channel, stub = engine_stub(stack)
            async with channel:
                results = await asyncio.gather(*(collect(stub, stream_request(f"acme/{n}", prompt)) for n in names))
            return [r.token_ids for r in results]

        assert asyncio.run(run_all()) == want
    finally:
        stack.stop()


def test_disk_tier_serves_an_adapter_the_host_tier_evicted(
    tiny_models: dict[str, Path], tiny_adapters: dict[str, dict[str, Path]], tmp_path: Path
) -> None:
    # A host budget that holds all-r8 (~64 KiB in fp32) or qv-r4 (~7 KiB), never both.
    extra = ["--host-adapter-bytes", "70000", "--disk-cache-dir", str(tmp_path / "disk")]
    stack = start_stack(tiny_models["llama"], tmp_path, extra)
    try:
        for name in ("all-r8", "qv-r4"):
            asyncio.run(push(stack.registry.address, f"acme/{name}", tiny_adapters["llama"][name]))

        async def scenario() -> None:
            channel, stub = engine_stub(stack)
            async with channel:
                first = await collect(stub, stream_request("acme/all-r8", [4, 5, 6]))
                await collect(stub, stream_request("acme/qv-r4", [4, 5, 6]))  # evicts all-r8 from the host tier
                downloads = stack.metric("loraplex_adapter_cache_events_total", tier="registry", event="download")
                again = await collect(stub, stream_request("acme/all-r8", [4, 5, 6]))
                assert again.token_ids == first.token_ids
                assert stack.metric("loraplex_adapter_cache_events_total", tier="disk", event="hit") == 1
                assert stack.metric("loraplex_adapter_cache_events_total", tier="host", event="eviction") >= 1
                assert (
                    stack.metric("loraplex_adapter_cache_events_total", tier="registry", event="download") == downloads
                )
                assert stack.metric("loraplex_adapter_cache_bytes", tier="disk") > 0

        asyncio.run(scenario())
    finally:
        stack.stop()
