"""Issue 9's engine items against real subprocesses: drain on SIGTERM, which base model is served, tenancy of the
resident listing, immutable references while the registry is down, every outcome counted, router metrics."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.engine.v1 import engine_service_pb2 as epb
from loraplex.engine.v1 import engine_service_pb2_grpc as epb_grpc
from loraplex.registry.client import RegistryClient
from tests.e2e.stack import (
    BASE_MODEL,
    Stack,
    collect,
    engine_args,
    engine_stub,
    push,
    register,
    registry_args,
    start_stack,
    stream_request,
)
from tests.e2e.test_engine_auth_and_deadlines import TOKENS
from tests.fixtures.hf import read_adapter
from tests.fixtures.procs import ServerProcess, start_server
from tests.services.rpc_helpers import expect_failure, failure_of


def _long(adapter: str = "") -> epb.GenerateStreamRequest:
    request = stream_request(adapter, [3, 4, 5], max_new_tokens=100_000)
    request.stopping.ignore_eos = True
    return request


def test_sigterm_drains_then_ends_the_rest_with_shutting_down(tiny_models: dict[str, Path]) -> None:
    """Requests that can finish within --drain-seconds do; the rest end with UNAVAILABLE SHUTTING_DOWN."""
    args = engine_args(tiny_models["llama"], None, "--drain-seconds", "2", "--max-num-seqs", "2")
    engine = start_server(args, timeout=180)
    stack = Stack(registry=engine, engine=engine, model_dir=tiny_models["llama"])

    async def scenario() -> None:
        channel, stub = engine_stub(stack)
        health = health_pb2_grpc.HealthStub(channel)
        async with channel:
            short = stream_request("", [3, 4, 5], max_new_tokens=8)
            short.stopping.ignore_eos = True
            shorts = [asyncio.create_task(collect(stub, short)) for _ in range(3)]
            await asyncio.sleep(0.2)
            # ~250 tokens each, 2 at once: 12 rounds of ~250 steps, far more than a 2 s drain even on a fast CPU
            longs = [asyncio.create_task(collect(stub, _long())) for _ in range(24)]
            await asyncio.sleep(0.3)
            started = time.monotonic()
            engine.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            status = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
            await expect_failure(collect(stub, short), grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN")
            done = await asyncio.gather(*shorts)
            assert all(len(d.token_ids) == 8 and d.finish == epb.FINISH_REASON_MAX_TOKENS for d in done)
            ended = 0
            for outcome in await asyncio.gather(*longs, return_exceptions=True):
                if isinstance(outcome, grpc.aio.AioRpcError):
                    failure = failure_of(outcome)
                    assert failure.code == grpc.StatusCode.UNAVAILABLE and failure.reason == "SHUTTING_DOWN", failure
                    ended += 1
                else:
                    assert not isinstance(outcome, BaseException), outcome
                    assert outcome.finish == epb.FINISH_REASON_MAX_TOKENS
            assert ended >= 1, "24 long requests cannot all finish in two seconds on a 2-sequence batch"
            assert 1.5 <= time.monotonic() - started <= 15

    try:
        asyncio.run(scenario())
        assert engine.proc.wait(timeout=30) == 0
    finally:
        engine.stop()


def _engine_without_base_model(model: Path, registry: str) -> list[str]:
    args = engine_args(model, registry)
    i = args.index("--base-model")
    return args[:i] + args[i + 2 :]


def test_engine_finds_its_registered_base_model(
    tiny_models: dict[str, Path], tiny_adapters: dict[str, dict[str, Path]], tmp_path: Path
) -> None:
    registry = start_server(registry_args(f"sqlite:///{tmp_path}/r.db", f"file://{tmp_path}/blobs"))
    engines: list[ServerProcess] = []
    try:
        llama, mistral = tiny_models["llama"], tiny_models["mistral"]
        asyncio.run(register(registry.address, llama, "tiny-llama"))
        asyncio.run(register(registry.address, mistral, "tiny-mistral"))
        # An adapter of the same shapes, registered for the other base model.
        asyncio.run(push(registry.address, "acme/for-mistral", tiny_adapters["mistral"]["qv-r4"], "tiny-mistral"))
        engine = start_server(_engine_without_base_model(llama, registry.address), timeout=180)
        engines.append(engine)
        stack = Stack(registry=registry, engine=engine, model_dir=llama)

        async def scenario() -> None:
            channel, stub = engine_stub(stack)
            async with channel:
                info = await stub.GetModelInfo(epb.GetModelInfoRequest())
                assert info.base_model == "tiny-llama"
                await expect_failure(
                    collect(stub, stream_request("acme/for-mistral", [3, 4])),
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "ADAPTER_INCOMPATIBLE",
                )

        asyncio.run(scenario())
        # Two registered names for the same config: the engine cannot tell which one it serves.
        asyncio.run(register(registry.address, llama, "tiny-llama-copy"))
        with pytest.raises(RuntimeError, match="BASE_MODEL_AMBIGUOUS") as info:
            start_server(_engine_without_base_model(llama, registry.address), timeout=180)
        assert "Traceback" not in str(info.value)
        with pytest.raises(RuntimeError, match="BASE_MODEL_UNKNOWN"):
            start_server(_engine_without_base_model(tiny_models["qwen2"], registry.address), timeout=180)
    finally:
        for engine in engines:
            engine.stop()
        registry.stop()




def test_resident_listing_shows_only_what_the_caller_may_read(
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
                await client.register_base_model(BASE_MODEL, (model / "config.json").read_text())
                for name, zoo in (("acme/mine", "qv-r4"), ("beta/theirs", "all-r8")):
                    await client.create_adapter(name, BASE_MODEL)
                    await client.upload(name, *read_adapter(tiny_adapters["llama"][zoo]))

        asyncio.run(seed())
        engine = start_server([*engine_args(model, registry.address), "--tokens-file", str(tokens)], timeout=180)
        stack = Stack(registry=registry, engine=engine, model_dir=model)

        async def scenario() -> None:
            channel, stub = engine_stub(stack)
            admin, acme = (("authorization", "Bearer admin-t"),), (("authorization", "Bearer acme-t"),)
            async with channel:
                for name in ("acme/mine", "beta/theirs"):
                    await stub.PrefetchAdapter(epb.PrefetchAdapterRequest(adapter=name), metadata=admin)
                everything = await stub.ListResidentAdapters(epb.ListResidentAdaptersRequest(), metadata=admin)
                assert sorted(a.adapter for a in everything.adapters) == ["acme/mine", "beta/theirs"]
                mine = await stub.ListResidentAdapters(epb.ListResidentAdaptersRequest(), metadata=acme)
                assert [a.adapter for a in mine.adapters] == ["acme/mine"]

        asyncio.run(scenario())
    finally:
        if engine is not None:
            engine.stop()
        registry.stop()


def test_immutable_references_resolve_offline(
    tiny_models: dict[str, Path], tiny_adapters: dict[str, dict[str, Path]], tmp_path: Path
) -> None:
    stack = start_stack(tiny_models["llama"], tmp_path)
    try:
        digest = asyncio.run(push(stack.registry.address, "acme/a1", tiny_adapters["llama"]["qv-r4"]))
        asyncio.run(push(stack.registry.address, "acme/a2", tiny_adapters["llama"]["all-r8"]))

        async def scenario() -> None:
            channel, stub = engine_stub(stack)
            async with channel:
                want = await collect(stub, stream_request("acme/a1", [4, 5, 6]))
                stack.registry.stop()
                for ref in ("acme/a1@1", f"acme/a1@{digest}", "acme/a1"):
                    got = await collect(stub, stream_request(ref, [4, 5, 6]))
                    assert got.token_ids == want.token_ids, ref
                await expect_failure(collect(stub, stream_request("acme/a1@2", [4, 5])), grpc.StatusCode.UNAVAILABLE)
                await expect_failure(collect(stub, stream_request("acme/a2@1", [4, 5])), grpc.StatusCode.UNAVAILABLE)

        asyncio.run(scenario())
    finally:
        stack.stop()


def test_every_outcome_is_counted_and_router_metrics_are_exported(
    tiny_models: dict[str, Path], tiny_adapters: dict[str, dict[str, Path]], tmp_path: Path
) -> None:
    stack = start_stack(tiny_models["llama"], tmp_path, ["--max-queue", "2", "--max-num-seqs", "1"])
    try:
        asyncio.run(push(stack.registry.address, "acme/a1", tiny_adapters["llama"]["qv-r4"]))
        asyncio.run(push(stack.registry.address, "beta/b1", tiny_adapters["llama"]["all-r8"]))

        async def scenario() -> None:
            channel, stub = engine_stub(stack)
            async with channel:
                await collect(stub, stream_request("acme/a1", [4, 5, 6]))
                await expect_failure(collect(stub, stream_request("acme/nope", [4])), grpc.StatusCode.NOT_FOUND)
                bad = stream_request("", [4])
                bad.sampling.temperature = -1
                await expect_failure(collect(stub, bad), grpc.StatusCode.INVALID_ARGUMENT)
                running = asyncio.create_task(collect(stub, _long("acme/a1")))
                await asyncio.sleep(0.2)
                waiting = asyncio.create_task(collect(stub, _long("beta/b1")))
                for _ in range(100):  # until the second request waits behind the first (max-num-seqs 1)
                    if stack.metric("loraplex_num_requests_waiting") == 1:
                        break
                    await asyncio.sleep(0.1)
                await expect_failure(collect(stub, stream_request("", [4])), grpc.StatusCode.RESOURCE_EXHAUSTED)
                assert stack.metric("loraplex_num_requests_running") == 1
                assert stack.metric("loraplex_num_requests_waiting") == 1
                assert 0 < stack.metric("loraplex_kv_cache_usage_perc") < 1
                info = stack.metric(
                    "loraplex_lora_requests_info",
                    running_lora_adapters="acme/a1",
                    waiting_lora_adapters="beta/b1",
                    max_lora="256",
                )
                assert abs(info - time.time()) < 30
                assert (
                    stack.metric(
                        "loraplex_lora_adapter_loaded", adapter="acme/a1@1", tier="gpu", pinned="false", rank="4"
                    )
                    == 1
                )
                running.cancel()
                waiting.cancel()
                await asyncio.gather(running, waiting, return_exceptions=True)
            counted = {
                code: stack.metric("loraplex_requests_total", door="grpc", code=code)
                for code in ("OK", "NOT_FOUND", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "CANCELLED")
            }
            assert counted["OK"] >= 1 and counted["NOT_FOUND"] == 1 and counted["INVALID_ARGUMENT"] == 1
            assert counted["RESOURCE_EXHAUSTED"] == 1
            for _ in range(50):
                if stack.metric("loraplex_requests_total", door="grpc", code="CANCELLED") == 2:
                    break
                await asyncio.sleep(0.1)
            assert stack.metric("loraplex_requests_total", door="grpc", code="CANCELLED") == 2
            async with engine_stub(stack)[0] as channel2:
                model = await epb_grpc.EngineServiceStub(channel2).GetModelInfo(epb.GetModelInfoRequest())
            blocks = str(model.kv_cache_blocks)
            assert stack.metric("loraplex_cache_config_info", block_size="16", num_gpu_blocks=blocks) == 1

        asyncio.run(scenario())
    finally:
        stack.stop()
