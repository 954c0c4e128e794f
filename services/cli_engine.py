"""CLI handlers for ``engine serve`` and ``generate`` (needs the engine extra: torch)."""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from typing import Any

import grpc

from loraplex.engine.v1 import engine_service_pb2 as pb
from loraplex.engine.v1 import engine_service_pb2_grpc as pb_grpc
from loraplex.registry.client import error_from_rpc
from loraplex.services.cli_output import emit, message_json, note, wants_json
from loraplex.services.settings import EngineSettings, add_arguments, from_sources

DEFAULT_ENGINE = "127.0.0.1:50051"
# Routers (HAProxy, the inference gateway) hash on this header to keep an adapter on few replicas.
ADAPTER_HEADER = "x-loraplex-adapter"


def add_commands(top: Any, client: argparse.ArgumentParser, as_json: argparse.ArgumentParser) -> None:
    engine = top.add_parser("engine", help="run the multi-LoRA engine").add_subparsers(dest="action", required=True)
    serve_parser = engine.add_parser("serve", help="serve a base model with adapters pulled from the registry")
    add_arguments(serve_parser, EngineSettings)
    serve_parser.set_defaults(handler=serve)

    gen = top.add_parser("generate", parents=[as_json], help="stream a completion from a running engine")
    gen.add_argument("prompt")
    gen.add_argument("--engine", default=DEFAULT_ENGINE, help="engine address HOST:PORT [env LORAPLEX_ENGINE]")
    gen.add_argument("--adapter", default="", help="registry reference; empty = the base model")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    gen.add_argument("--token", default=None, help="bearer token [env LORAPLEX_TOKEN]")
    gen.add_argument("--timeout", type=float, default=120.0)
    gen.add_argument("--request-id", default="", help="x-request-id to send (default: a new one, printed)")
    gen.set_defaults(handler=generate)


async def serve(args: argparse.Namespace) -> int:
    from loraplex.services.engine_app import serve_engine
    from loraplex.services.logs import configure_logging

    settings = from_sources(EngineSettings, args)
    configure_logging(settings.log_level)
    await serve_engine(settings)  # a failed start stops what it started before the error reaches the CLI
    return 0


def request_metadata(adapter: str, token: str | None, request_id: str) -> tuple[tuple[str, str], ...]:
    """The metadata every engine call carries: the adapter for routers, the request id, the bearer token."""
    metadata = [(ADAPTER_HEADER, adapter), ("x-request-id", request_id)]
    if token:
        metadata.append(("authorization", f"Bearer {token}"))
    return tuple(metadata)


def _check_ranges(args: argparse.Namespace) -> None:
    from loraplex.registry.errors import InvalidArgument

    if args.max_new_tokens < 1:
        raise InvalidArgument(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not args.timeout > 0:
        raise InvalidArgument(f"--timeout must be more than 0, got {args.timeout}")


async def generate(args: argparse.Namespace) -> int:
    _check_ranges(args)
    address = os.environ.get("LORAPLEX_ENGINE", args.engine) if args.engine == DEFAULT_ENGINE else args.engine
    token = args.token or os.environ.get("LORAPLEX_TOKEN")
    request_id = args.request_id or uuid.uuid4().hex
    sampling = pb.SamplingParams()
    for field in ("temperature", "top_p", "top_k", "seed"):
        value = getattr(args, field)
        if value is not None:
            setattr(sampling, field, value)
    request = pb.GenerateStreamRequest(
        request_id=request_id,
        adapter=args.adapter,
        text=args.prompt,
        sampling=sampling,
        stopping=pb.StoppingCriteria(max_new_tokens=args.max_new_tokens, stop_sequences=args.stop),
    )
    as_json = wants_json(args)
    text: list[str] = []
    result: dict[str, Any] = {"request_id": request_id}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.EngineServiceStub(channel)
        metadata = request_metadata(args.adapter, token, request_id)
        try:
            async for message in stub.GenerateStream(request, metadata=metadata, timeout=args.timeout):
                if message.HasField("adapter"):
                    a = message.adapter
                    result["adapter"] = message_json(a)
                    note(f"[{a.adapter}@{a.version} {a.digest[:19]}… request {request_id}]")
                text.append(message.text)
                if not as_json:
                    sys.stdout.write(message.text)
                    sys.stdout.flush()
                if message.finish_reason:
                    reason = pb.FinishReason.Name(message.finish_reason).removeprefix("FINISH_REASON_").lower()
                    result |= {"finish_reason": reason, "usage": message_json(message.usage)}
                    note(f"[{reason}; {message.usage.completion_tokens} tokens]")
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, peer="engine") from None
    if as_json:
        emit(args, result | {"text": "".join(text)}, "")
    else:
        print()
    return 0
