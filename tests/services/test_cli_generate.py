"""``loraplex generate`` as routers see it: every call carries ``x-loraplex-adapter`` and ``x-request-id``.

Why a recording engine: the behaviour under test is what the CLI puts on the wire. A real gRPC server on loopback
that records each call's metadata and answers with a short stream stands in for the engine; the CLI runs as the
real ``loraplex`` subprocess.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import grpc

from loraplex.engine.v1 import engine_service_pb2 as pb
from loraplex.engine.v1 import engine_service_pb2_grpc as pb_grpc
from tests.fixtures.procs import LORAPLEX


class RecordingEngine(pb_grpc.EngineServiceServicer):
    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, str], pb.GenerateStreamRequest]] = []

    async def GenerateStream(
        self, request: pb.GenerateStreamRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        self.calls.append(({k: v for k, v in context.invocation_metadata() or ()}, request))
        adapter = pb.ResolvedAdapter(ref=request.adapter, adapter="acme/bot", version=3, digest="sha256:" + "ab" * 32)
        yield pb.GenerateStreamResponse(request_id=request.request_id, text="hel", adapter=adapter)
        yield pb.GenerateStreamResponse(
            request_id=request.request_id,
            text="lo",
            usage=pb.Usage(prompt_tokens=4, completion_tokens=2),
            finish_reason=pb.FINISH_REASON_MAX_TOKENS,
        )


async def _run(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        LORAPLEX, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=dict(os.environ)
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_generate_sends_the_adapter_and_request_id_headers_and_prints_one_json_document() -> None:
    engine = RecordingEngine()
    server = grpc.aio.server()
    pb_grpc.add_EngineServiceServicer_to_server(engine, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        address = f"127.0.0.1:{port}"
        code, out, err = await _run("generate", "--engine", address, "--adapter", "acme/bot@prod", "--json", "hi")
        assert code == 0, err
        assert out.startswith("{"), out
        result = json.loads(out)
        assert result["text"] == "hello" and result["finish_reason"] == "max_tokens"
        assert result["usage"] == {"prompt_tokens": 4, "completion_tokens": 2}
        assert result["adapter"]["version"] == 3
        code, out, err = await _run(
            "generate", "--engine", address, "--request-id", "req-7", "--token", "t0k", "hello there"
        )
        assert code == 0 and out == "hello\n" and "[max_tokens; 2 tokens]" in err, (out, err)
        code, out, err = await _run("generate", "--engine", address, "base model please")
        assert code == 0, err
    finally:
        await server.stop(None)
    (first, first_request), (second, second_request), (third, _) = engine.calls
    assert first["x-loraplex-adapter"] == "acme/bot@prod"
    assert (
        first["x-request-id"] == result["request_id"] == first_request.request_id and len(first["x-request-id"]) >= 16
    )
    assert second["x-request-id"] == second_request.request_id == "req-7"
    assert second["x-loraplex-adapter"] == "" and second["authorization"] == "Bearer t0k"
    assert third["x-loraplex-adapter"] == "" and third["x-request-id"] not in (first["x-request-id"], "req-7")
