"""The OpenAI-compatible HTTP API of a real ``loraplex engine serve`` process, with the official ``openai`` client.

The engine runs as users run it (a subprocess with ``--http-listen``, a registry subprocess beside it); a
concurrent mix of adapters and the base model through HTTP must equal the PEFT oracle, and SIGTERM must end the
process cleanly.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.e2e.stack import Stack, engine_args, push, start_stack
from tests.engine.helpers import prompts
from tests.fixtures.procs import start_server
from tests.services.openai_helpers import BASE_MODEL, build_zoo, finish_for, ids_of, oracle

HTTP_LINE = re.compile(r"engine http on port (\d+)")
ADAPTERS = ("qv-r4", "all-r8", "attn-r16-rs")
NEW = 6


@pytest.fixture(scope="module")
def stack(
    tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Stack, dict[str, Path]]]:
    tmp = tmp_path_factory.mktemp("openai-e2e")
    zoo = build_zoo(tiny_models["llama"], tmp / "adapters", ADAPTERS)
    running = start_stack(tiny_models["llama"], tmp)
    try:
        for name, folder in zoo.items():
            running.pushed[name] = asyncio.run(push(running.registry.address, f"acme/{name}", folder))
        yield running, zoo
    finally:
        running.stop()


def http_port(stack: Stack) -> int:
    match = HTTP_LINE.search(stack.engine.log())
    assert match, stack.engine.log()
    return int(match.group(1))


def test_a_concurrent_mix_through_http_matches_peft(stack: tuple[Stack, dict[str, Path]]) -> None:
    running, zoo = stack
    names = [*ADAPTERS, "__base__"]
    batch = prompts(12, 5, seed=21)
    rows = [(names[i % len(names)], batch[i]) for i in range(12)]
    want = oracle(running.model_dir, zoo, rows, NEW)

    async def one(client: openai.AsyncOpenAI, name: str, prompt: list[int], stream: bool) -> tuple[list[int], str]:
        model = BASE_MODEL if name == "__base__" else f"acme/{name}"
        kwargs = dict(model=model, prompt=prompt, max_tokens=NEW, temperature=0, logprobs=0)
        extra = {"return_tokens_as_token_ids": True}
        if not stream:
            result = await client.completions.create(**kwargs, extra_body=extra)  # type: ignore[call-overload]
            choice = result.choices[0]
            return ids_of(choice.logprobs.tokens), str(choice.finish_reason)
        ids: list[int] = []
        finish = ""
        async for chunk in await client.completions.create(**kwargs, stream=True, extra_body=extra):  # type: ignore[call-overload]
            ids += ids_of(chunk.choices[0].logprobs.tokens or [])
            finish = str(chunk.choices[0].finish_reason or finish)
        return ids, finish

    async def scenario() -> list[tuple[list[int], str]]:
        base_url = f"http://127.0.0.1:{http_port(running)}/v1"
        async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120) as client:
            listed = await client.models.list()
            assert [m.id for m in listed.data] == [BASE_MODEL]
            results = await asyncio.gather(*(one(client, n, p, i % 2 == 1) for i, (n, p) in enumerate(rows)))
            held = {m.id for m in (await client.models.list()).data}
            assert held == {BASE_MODEL, *(f"acme/{n}@1" for n in ADAPTERS)}
            return results

    results = asyncio.run(scenario())
    for (name, _), expected, (ids, finish) in zip(rows, want, results, strict=True):
        assert ids == expected, name
        assert finish == finish_for(expected, NEW), name
    assert running.metric("loraplex_requests_total", door="http", code="OK") == 12  # counted like gRPC


def test_sigterm_stops_the_http_door_cleanly(tiny_models: dict[str, Path]) -> None:
    engine = start_server(engine_args(tiny_models["llama"], None), timeout=180)
    try:
        match = HTTP_LINE.search(engine.log())
        assert match, engine.log()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{match.group(1)}/v1", api_key="unused", max_retries=0)
        assert client.completions.create(model=BASE_MODEL, prompt="hello", max_tokens=2).usage is not None
        assert engine.stop() == 0
        assert "Traceback" not in engine.log()
        with pytest.raises(openai.APIConnectionError):
            client.completions.create(model=BASE_MODEL, prompt="hello", max_tokens=2)
    finally:
        engine.stop()
