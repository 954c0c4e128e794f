"""Tenancy through the engine (caller tokens forwarded to the registry), admin RPCs, deadlines, the CLI."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc

from loraplex.engine.v1 import engine_service_pb2 as epb
from loraplex.registry.client import RegistryClient
from tests.e2e.stack import Stack, collect, engine_args, engine_stub, registry_args, stream_request
from tests.fixtures.hf import read_adapter
from tests.fixtures.procs import run_cli, start_server
from tests.services.rpc_helpers import expect_failure

TOKENS = {
    "tokens": [
        {"name": "admin", "token": "admin-t", "namespaces": ["*"], "scopes": ["admin"]},
        {"name": "acme", "token": "acme-t", "namespaces": ["acme"], "scopes": ["read"]},
        {"name": "beta", "token": "beta-t", "namespaces": ["beta"], "scopes": ["read"]},
    ]
}


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def test_engine_forwards_caller_tokens_and_guards_admin_rpcs(
    tiny_models: dict[str, Path], tiny_adapters: dict[str, dict[str, Path]], tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    model = tiny_models["llama"]
    registry = start_server(
        [*registry_args(f"sqlite:///{tmp_path}/r.db", f"file://{tmp_path}/blobs"), "--tokens-file", str(tokens)]
    )
    engine = None
    try:

        async def seed() -> None:
            async with RegistryClient(registry.address, token="admin-t") as client:
                await client.register_base_model("tiny-llama", (model / "config.json").read_text())
                await client.create_adapter("acme/private", "tiny-llama")
                config, weights = read_adapter(tiny_adapters["llama"]["qv-r4"])
                await client.upload("acme/private", config, weights)

        asyncio.run(seed())
        engine = start_server([*engine_args(model, registry.address), "--tokens-file", str(tokens)], timeout=180)
        stack = Stack(registry=registry, engine=engine, model_dir=model)

        async def scenario() -> None:
            channel, stub = engine_stub(stack)
            async with channel:
                request = stream_request("acme/private", [3, 4, 5])
                ok = await collect(stub, request, metadata=bearer("acme-t"))
                assert ok.adapter is not None and ok.token_ids
                # The weights are now cached, yet another tenant is still refused by the registry's rules.
                await expect_failure(
                    collect(stub, request, metadata=bearer("beta-t")), grpc.StatusCode.PERMISSION_DENIED
                )
                await expect_failure(collect(stub, request), grpc.StatusCode.UNAUTHENTICATED)
                await expect_failure(collect(stub, request, metadata=bearer("nope")), grpc.StatusCode.UNAUTHENTICATED)
                evict = epb.EvictAdapterRequest(adapter="acme/private")
                await expect_failure(
                    stub.EvictAdapter(evict, metadata=bearer("acme-t")), grpc.StatusCode.PERMISSION_DENIED
                )
                pin = epb.PinAdapterRequest(adapter="acme/private", pinned=True)
                pinned = await stub.PinAdapter(pin, metadata=bearer("admin-t"))
                assert pinned.adapter.pinned and pinned.adapter.tier in (epb.CACHE_TIER_DEVICE, epb.CACHE_TIER_HOST)
                evicted = await stub.EvictAdapter(evict, metadata=bearer("admin-t"))
                assert list(evicted.digests) == [pinned.adapter.digest]
                listed = await stub.ListResidentAdapters(epb.ListResidentAdaptersRequest(), metadata=bearer("admin-t"))
                assert list(listed.adapters) == []
                prefetched = await stub.PrefetchAdapter(
                    epb.PrefetchAdapterRequest(adapter="acme/private"), metadata=bearer("acme-t")
                )
                assert prefetched.adapter.adapter == "acme/private" and prefetched.adapter.size_bytes > 0

        asyncio.run(scenario())
    finally:
        if engine is not None:
            engine.stop()
        registry.stop()


def test_deadline_stops_work_and_frees_memory(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    engine = start_server(engine_args(tiny_models["llama"], None), timeout=180)
    stack = Stack(registry=engine, engine=engine, model_dir=tiny_models["llama"])
    try:

        async def scenario() -> None:
            channel, stub = engine_stub(stack)
            async with channel:
                info = await stub.GetModelInfo(epb.GetModelInfoRequest())
                long = stream_request("", [3, 4, 5], max_new_tokens=100_000)
                long.stopping.ignore_eos = True
                results = await asyncio.gather(
                    *(collect(stub, long, timeout=0.5) for _ in range(4)), return_exceptions=True
                )
                assert all(
                    isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                    for r in results
                ), results
                for _ in range(50):
                    if stack.metric("loraplex_kv_blocks_free") == info.kv_cache_blocks:
                        break
                    await asyncio.sleep(0.1)
                assert stack.metric("loraplex_kv_blocks_free") == info.kv_cache_blocks
                assert stack.metric("loraplex_num_requests_running") == 0

        asyncio.run(scenario())
    finally:
        engine.stop()


def test_generate_cli_streams_to_the_terminal(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    engine = start_server(engine_args(tiny_models["llama"], None), timeout=180)
    try:
        result = run_cli(["generate", "--engine", engine.address, "--max-new-tokens", "5", "hello"])
        assert result.returncode == 0, result.stderr
        assert "[max_tokens; 5 tokens]" in result.stderr or "[eos_token;" in result.stderr
        missing = run_cli(["generate", "--engine", engine.address, "--adapter", "acme/x", "hi"])
        assert missing.returncode == 1 and "FAILED_PRECONDITION (NO_REGISTRY)" in missing.stderr
    finally:
        engine.stop()
