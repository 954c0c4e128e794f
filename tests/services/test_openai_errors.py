"""Every error class of the OpenAI door, auth, health, and that a client going away frees what it held.

One in-process stack: registry + engine with auth on, one PEFT adapter (``acme/qv-r4``), ``--max-queue 3`` and
a model folder without a chat template.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio

from loraplex.services import openai_http
from loraplex.services.auth import TokenAuthority
from loraplex.services.openai_api import build_app
from loraplex.services.openai_http import HttpServer
from tests.services.openai_helpers import ACME, ADMIN, BASE_MODEL, BETA, Served, build_zoo, close, serve

pytestmark = pytest.mark.asyncio(loop_scope="module")
LONG = {"max_tokens": 240, "ignore_eos": True, "temperature": 0}  # ~a second of decoding on the tiny model


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
    tmp = tmp_path_factory.mktemp("openai-errors")
    model = tiny_models["llama"]
    running = await serve(model, tmp, build_zoo(model, tmp / "adapters", ("qv-r4",)), auth=True, max_queue=3)
    try:
        yield running
    finally:
        await close(running)


def auth(token: str = ADMIN) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def expect(call: Any, error: type[openai.APIStatusError], code: str, param: str | None = None) -> None:
    with pytest.raises(error) as caught:
        await call
    body = caught.value.body
    assert isinstance(body, dict) and body["code"] == code, body
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    if param is not None:
        assert body["param"] == param


def counted(served: Served, code: str) -> float:
    value = served.app.metrics.registry.get_sample_value("loraplex_requests_total", {"door": "http", "code": code})
    return value or 0.0


async def settled(served: Served, digest: str | None = None) -> None:
    """Wait until nothing runs or waits, every KV block is free and no request holds an adapter."""
    engine = served.app.engine
    assert engine is not None
    for _ in range(200):
        st = engine.stats()
        busy = st.num_running or st.num_waiting or st.kv_blocks_free != st.kv_blocks_total
        refs = any(v.refcount or v.users for v in st.residents if digest is None or v.key == digest)
        if not busy and not refs:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"engine did not settle: {engine.stats()}")


async def first_event(response: httpx.Response) -> str:
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            return line
    raise AssertionError("no event")


# ---- 400 -----------------------------------------------------------------------------------------------------
async def test_bad_requests_are_400_with_the_field(served: Served) -> None:
    client = served.client()
    base: dict[str, Any] = {"model": BASE_MODEL, "prompt": [3, 4, 5]}
    bad = openai.BadRequestError
    await expect(client.completions.create(**base, n=2), bad, "INVALID_ARGUMENT", "n")
    await expect(client.completions.create(**base, temperature=-1), bad, "INVALID_ARGUMENT", "temperature")
    await expect(client.completions.create(**base, max_tokens="lots"), bad, "INVALID_ARGUMENT", "max_tokens")  # type: ignore[arg-type]
    await expect(client.completions.create(**base, frequency_penalty=0.5), bad, "INVALID_ARGUMENT", "frequency_penalty")
    await expect(client.completions.create(model=BASE_MODEL, prompt=[]), bad, "INVALID_ARGUMENT", "prompt")
    await expect(client.completions.create(**base, max_tokens=0), bad, "INVALID_ARGUMENT")  # 0 needs echo
    await expect(client.completions.create(**base, stop=["x"] * 17), bad, "INVALID_ARGUMENT")
    too_long = list(range(3, 300))
    await expect(client.completions.create(model=BASE_MODEL, prompt=too_long), bad, "INVALID_ARGUMENT")
    chat: dict[str, Any] = {"model": BASE_MODEL, "messages": [{"role": "user", "content": "hi"}]}
    await expect(client.chat.completions.create(**chat), bad, "NO_CHAT_TEMPLATE")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    await expect(client.chat.completions.create(**chat, tools=tools), bad, "INVALID_ARGUMENT", "tools")  # type: ignore[arg-type]
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]
    await expect(client.chat.completions.create(model=BASE_MODEL, messages=image), bad, "INVALID_ARGUMENT")  # type: ignore[arg-type]
    async with httpx.AsyncClient(base_url=served.base_url, timeout=30) as http:
        not_json = await http.post("/v1/completions", content=b"{", headers=auth())
        assert not_json.status_code == 400 and not_json.json()["error"]["type"] == "invalid_request_error"
        priority = await http.post("/v1/completions", json=base, headers={**auth(), "x-loraplex-priority": "high"})
        assert priority.status_code == 400 and priority.json()["error"]["param"] == "x-loraplex-priority"
        wrong_method = await http.get("/v1/completions", headers=auth())
        assert wrong_method.status_code == 405 and "error" in wrong_method.json()
    assert counted(served, "INVALID_ARGUMENT") >= 5  # refused requests are counted like gRPC ones


# ---- 401 / 403 -----------------------------------------------------------------------------------------------
async def test_auth_uses_the_engine_tokens_like_grpc(served: Served) -> None:
    body = {"model": "acme/qv-r4", "prompt": [3, 4, 5], "max_tokens": 2}
    await expect(served.client("nope").completions.create(**body), openai.AuthenticationError, "UNAUTHENTICATED")
    await expect(served.client(BETA).completions.create(**body), openai.PermissionDeniedError, "PERMISSION_DENIED")
    ok = await served.client(ACME).completions.create(**body)
    assert ok.choices[0].finish_reason in ("stop", "length")
    async with httpx.AsyncClient(base_url=served.base_url, timeout=30) as http:
        missing = await http.post("/v1/completions", json=body)
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert missing.json()["error"]["code"] == "UNAUTHENTICATED"
        basic = await http.post("/v1/completions", json=body, headers={"authorization": "Basic YTpi"})
        assert basic.status_code == 401
        twice = await http.post(
            "/v1/completions",
            json=body,
            headers=[("authorization", f"Bearer {ADMIN}"), ("authorization", f"Bearer {BETA}")],
        )
        assert twice.status_code == 401 and "exactly one" in twice.json()["error"]["message"]
        models = await http.get("/v1/models")
        assert models.status_code == 401
        health = await http.get("/health")  # probes need no token
        assert health.status_code == 200 and health.json() == {"status": "serving"}


# ---- 404 / 409 -----------------------------------------------------------------------------------------------
async def test_unknown_models_and_routes_are_404(served: Served) -> None:
    client = served.client()
    missing = openai.NotFoundError
    await expect(client.completions.create(model="gpt-4", prompt="x"), missing, "MODEL_NOT_FOUND")
    await expect(client.completions.create(model="acme/nope", prompt="x"), missing, "ADAPTER_NOT_FOUND")
    await expect(client.completions.create(model="acme/qv-r4@7", prompt="x"), missing, "VERSION_NOT_FOUND")
    async with httpx.AsyncClient(base_url=served.base_url, timeout=30) as http:
        route = await http.get("/v1/nothing", headers=auth())
        assert route.status_code == 404 and route.json()["error"]["type"] == "not_found_error"


async def test_a_request_id_in_flight_is_a_409(served: Served) -> None:
    body = {"model": BASE_MODEL, "prompt": [3, 4, 5], "stream": True, **LONG}
    headers = {**auth(), "x-request-id": "twice"}
    async with (
        httpx.AsyncClient(base_url=served.base_url, timeout=30) as http,
        http.stream("POST", "/v1/completions", json=body, headers=headers) as first,
    ):
        await first_event(first)
        again = await http.post("/v1/completions", json=body, headers=headers)
        assert again.status_code == 409 and again.json()["error"]["code"] == "ALREADY_EXISTS"
    await settled(served)


# ---- 429 / 503 -----------------------------------------------------------------------------------------------
async def test_a_full_queue_is_a_429(served: Served) -> None:
    body = {"model": BASE_MODEL, "prompt": [3, 4, 5], "stream": True, **LONG}
    async with httpx.AsyncClient(base_url=served.base_url, timeout=30) as http:
        streams = [http.stream("POST", "/v1/completions", json=body, headers=auth()) for _ in range(3)]
        responses = [await s.__aenter__() for s in streams]
        try:
            for response in responses:
                await first_event(response)
            await expect(
                served.client().completions.create(model=BASE_MODEL, prompt=[3, 4]), openai.RateLimitError, "QUEUE_FULL"
            )
        finally:
            for s in streams:
                await s.__aexit__(None, None, None)
    await settled(served)


async def test_health_and_requests_are_503_while_loading(tiny_models: dict[str, Path]) -> None:
    loading = await HttpServer.start(
        build_app(lambda: None, lambda: True, TokenAuthority.disabled(), tiny_models["llama"]),
        "127.0.0.1:0",
        TokenAuthority.disabled(),
        insecure=False,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{loading.port}", timeout=30) as http:
            health = await http.get("/health")
            assert health.status_code == 503 and health.json() == {"status": "loading"}
            early = await http.post("/v1/completions", json={"model": BASE_MODEL, "prompt": "x"})
            assert early.status_code == 503 and early.json()["error"]["code"] == "ENGINE_LOADING"
    finally:
        await loading.stop()


async def test_a_drain_answers_503_and_lets_streams_in_flight_finish(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    running = await serve(tiny_models["llama"], tmp_path, drain_seconds=60)
    try:
        body = {"model": BASE_MODEL, "prompt": [3, 4, 5], "stream": True, "max_tokens": 120, "ignore_eos": True}
        async with (
            httpx.AsyncClient(base_url=running.base_url, timeout=60) as http,
            http.stream("POST", "/v1/completions", json=body) as response,
        ):
            events = response.aiter_lines()
            lines = [await anext(line async for line in events if line.startswith("data: "))]
            stopping = asyncio.create_task(running.app.stop())
            for _ in range(100):
                health = await http.get("/health")
                if health.status_code == 503:
                    break
                await asyncio.sleep(0.02)
            assert health.status_code == 503 and health.json() == {"status": "draining"}
            refused = await http.post("/v1/completions", json={"model": BASE_MODEL, "prompt": [3], "max_tokens": 1})
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "SHUTTING_DOWN"
            lines += [line async for line in events if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
        await stopping
    finally:
        await close(running)


# ---- disconnects ---------------------------------------------------------------------------------------------
async def test_a_client_leaving_a_stream_aborts_it_and_frees_memory(served: Served) -> None:
    await settled(served)
    before = counted(served, "CANCELLED")
    body = {"model": "acme/qv-r4", "prompt": [3, 4, 5], "stream": True, **LONG}
    async with (
        httpx.AsyncClient(base_url=served.base_url, timeout=30) as http,
        http.stream("POST", "/v1/completions", json=body, headers=auth()) as response,
    ):
        await first_event(response)
    await settled(served, served.pushed["qv-r4"])
    assert counted(served, "CANCELLED") == before + 1  # aborted, not finished


async def test_a_client_leaving_a_whole_response_aborts_it_and_frees_memory(served: Served) -> None:
    await settled(served)
    before = counted(served, "CANCELLED")
    engine = served.app.engine
    assert engine is not None
    body = {"model": "acme/qv-r4", "prompt": [3, 4, 5], **LONG}
    async with httpx.AsyncClient(base_url=served.base_url, timeout=30) as http:
        call = asyncio.create_task(http.post("/v1/completions", json=body, headers=auth()))
        for _ in range(200):
            if engine.stats().num_running:
                break
            await asyncio.sleep(0.01)
        assert engine.stats().num_running == 1
        call.cancel()  # httpx drops the connection
        with pytest.raises(asyncio.CancelledError):
            await call
    await settled(served, served.pushed["qv-r4"])
    assert counted(served, "CANCELLED") == before + 1


# ---- HTTP-level limits and bugs --------------------------------------------------------------------------------
async def test_bodies_over_the_limit_are_413(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openai_http, "MAX_BODY_BYTES", 1000)
    body = {"model": BASE_MODEL, "prompt": "x" * 2000}

    async def chunked() -> AsyncIterator[bytes]:
        payload = json.dumps(body).encode()
        for i in range(0, len(payload), 500):
            yield payload[i : i + 500]

    async with httpx.AsyncClient(base_url=served.base_url, timeout=30) as http:
        declared = await http.post("/v1/completions", json=body, headers=auth())
        streamed = await http.post(
            "/v1/completions", content=chunked(), headers={**auth(), "content-type": "application/json"}
        )
    for response in (declared, streamed):
        assert response.status_code == 413 and response.json()["error"]["type"] == "invalid_request_error"


async def test_a_bug_is_a_500_that_reveals_nothing(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = served.app.servicer.runtime
    assert runtime is not None

    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret detail")

    monkeypatch.setattr(runtime.frontend, "submit", broken)
    async with httpx.AsyncClient(base_url=served.base_url, timeout=30) as http:
        response = await http.post(
            "/v1/completions", json={"model": BASE_MODEL, "prompt": "x"}, headers={**auth(), "x-request-id": "bug-1"}
        )
    error = response.json()["error"]
    assert response.status_code == 500 and error["code"] == "INTERNAL" and error["type"] == "server_error"
    assert "secret" not in response.text, response.text
    assert "bug-1" in error["message"] and response.headers["x-request-id"] == "bug-1"
