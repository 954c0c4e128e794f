"""CLI handlers for ``engine serve`` and ``generate`` (needs the engine extra: torch)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import grpc

from loraplex.engine.v1 import engine_service_pb2 as pb
from loraplex.engine.v1 import engine_service_pb2_grpc as pb_grpc
from loraplex.registry.client import error_from_rpc
from loraplex.services.settings import EngineSettings, add_arguments, from_sources


def add_commands(top: Any, client: argparse.ArgumentParser, as_json: argparse.ArgumentParser) -> None:
    engine = top.add_parser("engine", help="run the multi-LoRA engine").add_subparsers(dest="action", required=True)
    serve_parser = engine.add_parser("serve", help="serve a base model with adapters pulled from the registry")
    add_arguments(serve_parser, EngineSettings)
    serve_parser.set_defaults(handler=serve)

    gen = top.add_parser("generate", help="stream a completion from a running engine")
    gen.add_argument("prompt")
    gen.add_argument("--engine", default="127.0.0.1:50051", help="engine address HOST:PORT [env LORAPLEX_ENGINE]")
    gen.add_argument("--adapter", default="", help="registry reference; empty = the base model")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    gen.add_argument("--token", default=None, help="bearer token [env LORAPLEX_TOKEN]")
    gen.add_argument("--timeout", type=float, default=120.0)
    gen.set_defaults(handler=generate)


async def serve(args: argparse.Namespace) -> int:
    from loraplex.services.engine_app import serve_engine
    from loraplex.services.logs import configure_logging

    settings = from_sources(EngineSettings, args)
    configure_logging(settings.log_level)
    await serve_engine(settings)
    return 0


async def generate(args: argparse.Namespace) -> int:
    import os

    address = os.environ.get("LORAPLEX_ENGINE", args.engine) if args.engine == "127.0.0.1:50051" else args.engine
    token = args.token or os.environ.get("LORAPLEX_TOKEN")
    sampling = pb.SamplingParams()
    for field in ("temperature", "top_p", "top_k", "seed"):
        value = getattr(args, field)
        if value is not None:
            setattr(sampling, field, value)
    request = pb.GenerateStreamRequest(
        adapter=args.adapter,
        text=args.prompt,
        sampling=sampling,
        stopping=pb.StoppingCriteria(max_new_tokens=args.max_new_tokens, stop_sequences=args.stop),
    )
    metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
    if args.adapter:  # a proxy in front of many engines routes on this (docs/api.md, "Routing header")
        metadata += (("x-loraplex-adapter", args.adapter),)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.EngineServiceStub(channel)
        try:
            async for message in stub.GenerateStream(request, metadata=metadata, timeout=args.timeout):
                if message.HasField("adapter"):
                    a = message.adapter
                    print(f"[{a.adapter}@{a.version} {a.digest[:19]}…]", file=sys.stderr)
                sys.stdout.write(message.text)
                sys.stdout.flush()
                if message.finish_reason:
                    reason = pb.FinishReason.Name(message.finish_reason).removeprefix("FINISH_REASON_").lower()
                    print(f"\n[{reason}; {message.usage.completion_tokens} tokens]", file=sys.stderr)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, peer="engine") from None
    return 0
