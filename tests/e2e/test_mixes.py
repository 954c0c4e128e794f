"""Per-request adapter mixes through gRPC, against PEFT ``add_weighted_adapter`` (issue 12 part 2).

A mix and its members run in one batch; greedy tokens equal PEFT's for the same combination; bad mixes are typed
errors; every member must be readable by the caller.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from loraplex.engine.v1 import engine_service_pb2 as epb
from tests.e2e.stack import Stack, collect, engine_stub, push, start_stack, stream_request
from tests.engine.helpers import peft_model, prompts, until_eos
from tests.services.rpc_helpers import expect_failure

NEW_TOKENS = 8
EOS = 1
MEMBERS = ("qv-r4", "mlp-r32", "all-r8", "pattern-r8", "embed-head-r8")


@pytest.fixture(scope="module")
def stack(
    tiny_models: dict[str, Path], tiny_adapters: dict[str, dict[str, Path]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    running = start_stack(tiny_models["llama"], tmp_path_factory.mktemp("mixes"))
    try:
        for name in MEMBERS:
            asyncio.run(push(running.registry.address, f"acme/{name}", tiny_adapters["llama"][name]))
        yield running
    finally:
        running.stop()


def mix_request(
    prompt: list[int], members: list[tuple[str, float]], method: int, density: float | None = None
) -> epb.GenerateStreamRequest:
    request = stream_request("", prompt, max_new_tokens=NEW_TOKENS)
    request.mix.adapters.extend(epb.WeightedAdapter(adapter=f"acme/{name}", weight=w) for name, w in members)
    request.mix.method = method  # type: ignore[assignment]
    if density is not None:
        request.mix.density = density
    return request


def peft_mix_tokens(
    model_dir: Path,
    zoo: dict[str, Path],
    members: list[tuple[str, float]],
    combination: str,
    prompt: list[int],
    density: float | None = None,
) -> list[int]:
    model = peft_model(model_dir, {name: zoo[name] for name, _ in members})
    kwargs = {} if density is None else {"density": density}
    model.add_weighted_adapter(
        [name for name, _ in members], [w for _, w in members], "mixed", combination_type=combination, **kwargs
    )
    model.set_adapter("mixed")
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW_TOKENS)
    return until_eos(out[0, len(prompt) :].tolist(), EOS)


@pytest.mark.parametrize(
    ("members", "method", "combination", "density"),
    [
        ([("qv-r4", 0.7), ("mlp-r32", 1.3)], epb.MIX_METHOD_CAT, "cat", None),
        ([("all-r8", 0.5), ("pattern-r8", 1.5)], epb.MIX_METHOD_TIES, "ties_svd", 0.6),
        ([("all-r8", 1.0), ("embed-head-r8", -0.5)], epb.MIX_METHOD_LINEAR, "linear", None),
    ],
)
async def test_mix_matches_peft_add_weighted_adapter(
    stack: Stack,
    tiny_adapters: dict[str, dict[str, Path]],
    members: list[tuple[str, float]],
    method: int,
    combination: str,
    density: float | None,
) -> None:
    zoo = tiny_adapters["llama"]
    prompt = prompts(1, 6, seed=21)[0]
    want = peft_mix_tokens(stack.model_dir, zoo, members, combination, prompt, density)
    channel, stub = engine_stub(stack)
    async with channel:
        # the mix and each of its members in flight together
        calls = [collect(stub, mix_request(prompt, members, method, density))]
        calls += [
            collect(stub, stream_request(f"acme/{name}", prompt, max_new_tokens=NEW_TOKENS)) for name, _ in members
        ]
        got, *alone = await asyncio.gather(*calls)
    assert got.token_ids == want
    assert got.adapter is not None and got.adapter.digest.startswith("sha256:")
    assert all(member.token_ids for member in alone)


async def test_bad_mixes_are_typed_errors(stack: Stack) -> None:
    channel, stub = engine_stub(stack)
    async with channel:
        nine = mix_request([3, 4], [("qv-r4", 1.0)] * 9, epb.MIX_METHOD_CAT)
        await expect_failure(collect(stub, nine), grpc.StatusCode.INVALID_ARGUMENT)
        both = mix_request([3, 4], [("qv-r4", 1.0)], epb.MIX_METHOD_CAT)
        both.adapter = "acme/qv-r4"
        await expect_failure(collect(stub, both), grpc.StatusCode.INVALID_ARGUMENT)
        no_density = mix_request([3, 4], [("qv-r4", 1.0), ("all-r8", 1.0)], epb.MIX_METHOD_TIES)
        await expect_failure(collect(stub, no_density), grpc.StatusCode.INVALID_ARGUMENT)
        missing = mix_request([3, 4], [("qv-r4", 1.0), ("nope", 1.0)], epb.MIX_METHOD_CAT)
        await expect_failure(collect(stub, missing), grpc.StatusCode.NOT_FOUND)
        unequal = mix_request([3, 4], [("all-r8", 1.0), ("pattern-r8", 1.0)], epb.MIX_METHOD_LINEAR)
        await expect_failure(collect(stub, unequal), grpc.StatusCode.INVALID_ARGUMENT)
        too_big = mix_request([3, 4], [("mlp-r32", 1.0), ("mlp-r32", 0.5), ("all-r8", 1.0)], epb.MIX_METHOD_CAT)
        await expect_failure(collect(stub, too_big), grpc.StatusCode.FAILED_PRECONDITION, "ADAPTER_INCOMPATIBLE")
        ok = await collect(stub, mix_request([3, 4], [("qv-r4", 1.0)], epb.MIX_METHOD_CAT))
        assert ok.token_ids, "the engine keeps serving after every refusal"
