"""The OpenAI-compatible HTTP API against the PEFT oracle and transformers, with the official ``openai`` client.

One in-process stack per module (registry with four PEFT adapters under ``acme/``, engine with auth on, gRPC and
HTTP on free loopback ports, a Llama-3-style chat template in the model folder).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio
import torch

from tests.e2e.stack import collect, engine_stub, stream_request
from tests.engine.helpers import peft_model, prompts
from tests.services.openai_helpers import (
    ACME,
    ADMIN,
    BASE_MODEL,
    BETA,
    Served,
    build_zoo,
    close,
    finish_for,
    ids_of,
    model_with_template,
    oracle,
    serve,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")
ADAPTERS = ("qv-r4", "all-r8", "mlp-r32", "o-down-r12")
AS_IDS = {"return_tokens_as_token_ids": True}
NEW = 8


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
    tmp = tmp_path_factory.mktemp("openai")
    model_dir = model_with_template(tiny_models["llama"], tmp / "model")
    running = await serve(model_dir, tmp, build_zoo(model_dir, tmp / "adapters", ADAPTERS), auth=True)
    try:
        yield running
    finally:
        await close(running)


def model_name(adapter: str) -> str:
    return BASE_MODEL if adapter == "__base__" else f"acme/{adapter}"


async def complete(
    client: openai.AsyncOpenAI, model: str, prompt: list[int], stream: bool, extra: dict[str, Any] | None = None
) -> tuple[list[int], str, str]:
    """(token ids, text, finish reason) of one greedy completion, streamed or not."""
    kwargs: dict[str, Any] = dict(
        model=model, prompt=prompt, max_tokens=NEW, temperature=0, logprobs=0, extra_body={**AS_IDS, **(extra or {})}
    )
    if not stream:
        result = await client.completions.create(**kwargs)
        choice = result.choices[0]
        assert choice.logprobs is not None and choice.logprobs.tokens is not None
        return ids_of(choice.logprobs.tokens), choice.text, str(choice.finish_reason)
    ids: list[int] = []
    text, finish = "", ""
    async for chunk in await client.completions.create(stream=True, **kwargs):
        choice = chunk.choices[0]
        text += choice.text
        if choice.logprobs is not None and choice.logprobs.tokens:
            ids += ids_of(choice.logprobs.tokens)
        finish = str(choice.finish_reason or finish)
    return ids, text, finish


async def test_concurrent_mix_over_http_and_grpc_matches_peft(
    served: Served,
) -> None:
    names = [*ADAPTERS, "__base__"]
    batch = prompts(20, 6, seed=11)
    rows = [(names[i % len(names)], batch[i]) for i in range(20)]
    want = oracle(served.model_dir, served.adapters, rows, NEW)
    client = served.client()
    http = [complete(client, model_name(name), prompt, stream=i % 2 == 0) for i, (name, prompt) in enumerate(rows[:16])]
    channel, stub = engine_stub(f"127.0.0.1:{served.app.handle.port}")  # type: ignore[union-attr]
    metadata = (("authorization", f"Bearer {ADMIN}"),)
    async with channel:
        grpc_calls = [
            collect(stub, stream_request("" if n == "__base__" else f"acme/{n}", p, NEW), metadata=metadata)
            for n, p in rows[16:]
        ]
        results = await asyncio.gather(*http, *grpc_calls)
    tokenizer = served.app.engine.tokenizer  # type: ignore[union-attr]
    for (name, _), expected, got in zip(rows[:16], want[:16], results[:16], strict=True):
        ids, text, finish = got  # type: ignore[misc]
        assert ids == expected, name
        assert text == tokenizer.decode([t for t in ids if t != 1]), name
        assert finish == finish_for(expected, NEW)
    for (name, _), expected, streamed in zip(rows[16:], want[16:], results[16:], strict=True):
        assert streamed.token_ids == expected, name  # type: ignore[union-attr]


async def test_a_batch_of_prompts_gives_one_choice_each(served: Served) -> None:
    batch = prompts(3, 5, seed=3)
    client = served.client()
    whole = await client.completions.create(model="acme/all-r8", prompt=batch, max_tokens=4, temperature=0)
    singles = [
        await client.completions.create(model="acme/all-r8", prompt=p, max_tokens=4, temperature=0) for p in batch
    ]
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert [c.text for c in whole.choices] == [s.choices[0].text for s in singles]
    assert whole.usage is not None and whole.usage.prompt_tokens == 15
    texts = ["", "", ""]
    async for chunk in await client.completions.create(
        model="acme/all-r8", prompt=batch, max_tokens=4, temperature=0, stream=True
    ):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [s.choices[0].text for s in singles]


async def test_stream_is_server_sent_events_ending_with_done_and_adds_up(served: Served) -> None:
    body = {"model": "acme/qv-r4", "prompt": "hello world", "max_tokens": 6, "temperature": 0, "logprobs": 2}
    headers = {"authorization": f"Bearer {ADMIN}", "x-request-id": "sse-check-1"}
    async with httpx.AsyncClient(base_url=served.base_url, timeout=60) as http:
        whole = (await http.post("/v1/completions", json=body, headers=headers)).json()
        events: list[str] = []
        async with http.stream(
            "POST",
            "/v1/completions",
            json={**body, "stream": True, "stream_options": {"include_usage": True}},
            headers={**headers, "x-request-id": "sse-check-2"},
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["x-request-id"] == "sse-check-2"
            async for line in response.aiter_lines():
                if line:
                    assert line.startswith("data: ")
                    events.append(line.removeprefix("data: "))
    assert events[-1] == "[DONE]"
    import json

    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert all(c["usage"] is None for c in chunks[:-1])
    choices = [c["choices"][0] for c in chunks[:-1]]
    assert "".join(c["text"] for c in choices) == whole["choices"][0]["text"]
    assert choices[-1]["finish_reason"] == whole["choices"][0]["finish_reason"] == "length"
    tokens = [t for c in choices for t in c["logprobs"]["tokens"]]
    assert tokens == whole["choices"][0]["logprobs"]["tokens"]
    assert all(len(top) <= 2 for top in whole["choices"][0]["logprobs"]["top_logprobs"])
    assert whole["id"] == "cmpl-sse-check-1"


async def test_chat_renders_like_transformers_and_matches_peft(
    served: Served,
) -> None:
    from transformers import AutoTokenizer

    # The tiny tokenizer spells the template's header markers byte by byte: keep the chat short.
    messages = [{"role": "system", "content": "be tiny"}, {"role": "user", "content": "the lazy dog"}]
    hf = AutoTokenizer.from_pretrained(str(served.model_dir))
    encoded = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt_ids = list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
    want = oracle(served.model_dir, served.adapters, [("mlp-r32", prompt_ids)], 6)[0]
    client = served.client()
    kwargs: dict[str, Any] = dict(
        model="acme/mlp-r32", messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
    )
    whole = await client.chat.completions.create(**kwargs, extra_body=AS_IDS)
    assert whole.usage is not None and whole.usage.prompt_tokens == len(prompt_ids)
    content = whole.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and ids_of([c.token for c in content]) == want
    assert all(len(c.top_logprobs) == 2 for c in content)
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason == finish_for(want, 6)
    text, roles, finish, usage = "", [], None, None
    async for chunk in await client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    ):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            roles.append(choice.delta.role)
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert roles[0] == "assistant" and text == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason and usage == whole.usage


async def test_echo_with_max_tokens_0_scores_the_prompt_like_peft(
    served: Served,
) -> None:
    """What lm-eval's loglikelihood needs: per prompt token, its logprob and whether it was the top token."""
    prompt = "the quick brown fox jumps"
    client = served.client()
    result = await client.completions.create(
        model="acme/qv-r4", prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0, extra_body=AS_IDS
    )
    choice = result.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length"
    assert result.usage is not None and result.usage.completion_tokens == 0
    logprobs = choice.logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.token_logprobs and logprobs.top_logprobs
    ids = ids_of(logprobs.tokens)
    assert ids == served.app.engine.tokenizer.encode(prompt).ids  # type: ignore[union-attr]
    model = peft_model(served.model_dir, {"qv-r4": served.adapters["qv-r4"]})
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    want = torch.log_softmax(logits, dim=-1)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    for i in range(1, len(ids)):
        assert logprobs.token_logprobs[i] == pytest.approx(want[i - 1, ids[i]].item(), abs=1e-4)
        ((best, value),) = logprobs.top_logprobs[i].items()
        assert int(best.removeprefix("token_id:")) == int(want[i - 1].argmax())
        assert value == pytest.approx(want[i - 1].max().item(), abs=1e-4)


async def test_models_lists_the_base_and_the_adapters_held(served: Served) -> None:
    client = served.client()
    await client.completions.create(model="acme/o-down-r12", prompt=[5, 6, 7], max_tokens=1)
    listed = await client.models.list()
    by_id = {m.id: m.model_dump() for m in listed.data}
    assert by_id[BASE_MODEL]["parent"] is None
    card = by_id["acme/o-down-r12@1"]
    assert card["parent"] == BASE_MODEL and card["owned_by"] == "acme"
    assert card["digest"] == served.pushed["o-down-r12"]
    others = await served.client(BETA).models.list()  # a token without the acme namespace sees only the base
    assert [m.id for m in others.data] == [BASE_MODEL]
    assert "acme/o-down-r12@1" in {m.id for m in (await served.client(ACME).models.list()).data}


async def test_request_id_is_honoured_and_echoed(served: Served) -> None:
    async with httpx.AsyncClient(base_url=served.base_url, timeout=60) as http:
        auth = {"authorization": f"Bearer {ADMIN}"}
        ok = await http.post(
            "/v1/completions",
            json={"model": BASE_MODEL, "prompt": [3, 4], "max_tokens": 1},
            headers={**auth, "x-request-id": "my-id-7", "x-loraplex-priority": "5"},
        )
        assert ok.status_code == 200 and ok.headers["x-request-id"] == "my-id-7"
        assert ok.json()["id"] == "cmpl-my-id-7"
        generated = await http.get("/v1/models", headers=auth)
        assert len(generated.headers["x-request-id"]) > 8


async def test_an_adapter_mix_rides_in_the_body_like_grpc(served: Served) -> None:
    """The ``mix`` body field is the gRPC AdapterMix: the same members and weights give the same tokens."""
    prompt = prompts(1, 6, seed=31)[0]
    mix = {"adapters": [{"adapter": "acme/qv-r4", "weight": 0.7}, {"adapter": "acme/mlp-r32", "weight": 1.3}]}
    http = await complete(served.client(), BASE_MODEL, prompt, stream=False, extra={"mix": mix})
    request = stream_request("", prompt, NEW)
    request.mix.adapters.add(adapter="acme/qv-r4", weight=0.7)
    request.mix.adapters.add(adapter="acme/mlp-r32", weight=1.3)
    channel, stub = engine_stub(f"127.0.0.1:{served.app.handle.port}")  # type: ignore[union-attr]
    async with channel:
        via_grpc = await collect(stub, request, metadata=(("authorization", f"Bearer {ADMIN}"),))
    assert http[0] == via_grpc.token_ids
    client = served.client()
    with pytest.raises(openai.BadRequestError):  # a mix and an adapter at once
        await client.completions.create(model="acme/qv-r4", prompt=prompt, max_tokens=2, extra_body={"mix": mix})
    with pytest.raises(openai.BadRequestError):
        bad = {"adapters": mix["adapters"], "method": "median"}
        await client.completions.create(model=BASE_MODEL, prompt=prompt, max_tokens=2, extra_body={"mix": bad})
