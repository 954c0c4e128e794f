"""DoRA adapters and a merged hot adapter through the real registry and engine (issue 12), against PEFT."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from loraplex.engine.v1 import engine_service_pb2 as epb
from loraplex.services.demo_assets import ALL_LINEAR, AdapterSpec
from tests.e2e.stack import Stack, collect, engine_args, engine_stub, push, start_stack, stream_request
from tests.engine.helpers import peft_model, prompts, until_eos
from tests.fixtures.peft_variants import build_dora_adapter
from tests.fixtures.procs import start_server
from tests.services.rpc_helpers import expect_failure

NEW_TOKENS = 8
EOS = 1
DORA = AdapterSpec(r=8, lora_alpha=16, target_modules=tuple(ALL_LINEAR), seed=31)


@pytest.fixture(scope="module")
def stack(
    tiny_models: dict[str, Path], tiny_adapters: dict[str, dict[str, Path]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("family")
    running = start_stack(tiny_models["llama"], tmp)
    try:
        dora = build_dora_adapter(tiny_models["llama"], tmp / "dora", DORA, magnitude_seed=3)
        running.pushed["acme/dora"] = asyncio.run(push(running.registry.address, "acme/dora", dora))
        for name in ("all-r8", "qv-r4"):
            running.pushed[f"acme/{name}"] = asyncio.run(
                push(running.registry.address, f"acme/{name}", tiny_adapters["llama"][name])
            )
        yield running
    finally:
        running.stop()


def _peft_tokens(model_dir: Path, adapter: Path, prompt: list[int], merged: bool = False) -> list[int]:
    model = peft_model(model_dir, {"a": adapter})
    if merged:
        model = model.merge_and_unload()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW_TOKENS)
    return until_eos(out[0, len(prompt) :].tolist(), EOS)


async def test_a_dora_adapter_pushed_to_the_registry_serves_like_peft(stack: Stack, tmp_path: Path) -> None:
    prompt = prompts(1, 6, seed=41)[0]
    dora = build_dora_adapter(stack.model_dir, tmp_path / "dora", DORA, magnitude_seed=3)  # the same files
    want = _peft_tokens(stack.model_dir, dora, prompt)
    channel, stub = engine_stub(stack)
    async with channel:
        got = await collect(stub, stream_request("acme/dora", prompt, NEW_TOKENS))
        base = await collect(stub, stream_request("", prompt, NEW_TOKENS))
    assert got.token_ids == want and got.token_ids != base.token_ids


async def test_merge_and_unmerge_rpcs(stack: Stack, tiny_adapters: dict[str, dict[str, Path]]) -> None:
    prompt = prompts(1, 6, seed=42)[0]
    hot = tiny_adapters["llama"]["all-r8"]
    want_merged = _peft_tokens(stack.model_dir, hot, prompt, merged=True)
    want_other = _peft_tokens(stack.model_dir, tiny_adapters["llama"]["qv-r4"], prompt)
    channel, stub = engine_stub(stack)
    async with channel:
        merged = await stub.MergeAdapter(epb.MergeAdapterRequest(adapter="acme/all-r8"))
        assert merged.adapter.digest == stack.pushed["acme/all-r8"]
        info = await stub.GetModelInfo(epb.GetModelInfoRequest())
        assert info.merged_adapter.adapter == "acme/all-r8" and info.merged_adapter.version == 1
        await expect_failure(
            stub.MergeAdapter(epb.MergeAdapterRequest(adapter="acme/qv-r4")),
            grpc.StatusCode.FAILED_PRECONDITION,
            "ALREADY_MERGED",
        )
        hot_out, other = await asyncio.gather(
            collect(stub, stream_request("acme/all-r8", prompt, NEW_TOKENS)),
            collect(stub, stream_request("acme/qv-r4", prompt, NEW_TOKENS)),
        )
        assert hot_out.token_ids == want_merged and other.token_ids == want_other
        unmerged = await stub.UnmergeAdapter(epb.UnmergeAdapterRequest())
        assert unmerged.adapter.digest == stack.pushed["acme/all-r8"]
        assert not (await stub.GetModelInfo(epb.GetModelInfoRequest())).HasField("merged_adapter")
        await expect_failure(
            stub.MergeAdapter(epb.MergeAdapterRequest(adapter="acme/dora")), grpc.StatusCode.FAILED_PRECONDITION
        )


def test_merge_adapter_at_start(stack: Stack) -> None:
    args = engine_args(stack.model_dir, stack.registry.address, "--merge-adapter", "acme/qv-r4")
    engine = start_server(args, timeout=180)
    try:

        async def scenario() -> None:
            channel, stub = engine_stub(engine.address)
            async with channel:
                info = await stub.GetModelInfo(epb.GetModelInfoRequest())
                assert info.merged_adapter.adapter == "acme/qv-r4"

        asyncio.run(scenario())
    finally:
        engine.stop()
