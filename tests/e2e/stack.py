"""A real registry and a real engine as subprocesses, with PEFT adapters pushed through the CLI's client."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from loraplex.engine.v1 import engine_service_pb2 as epb
from loraplex.engine.v1 import engine_service_pb2_grpc as epb_grpc
from loraplex.registry.client import RegistryClient
from tests.fixtures.hf import read_adapter
from tests.fixtures.procs import ServerProcess, backend_registry_args, registry_args, start_server

BASE_MODEL = "tiny-llama"
METRICS_LINE = re.compile(r"metrics on port (\d+)")


@dataclass
class Stack:
    registry: ServerProcess
    engine: ServerProcess
    model_dir: Path
    pushed: dict[str, str] = field(default_factory=dict)  # registry name -> digest of the latest push

    @property
    def metrics_port(self) -> int:
        match = METRICS_LINE.search(self.engine.log())
        assert match, self.engine.log()
        return int(match.group(1))

    def metric(self, name: str, **labels: str) -> float:
        """One sample from the engine's Prometheus endpoint (0 when absent)."""
        body = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in body.splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            metric_name, _, label_part = key.partition("{")
            got = ",".join(sorted(label_part.rstrip("}").split(","))) if label_part else ""
            if metric_name == name and got == want:
                return float(value)
        return 0.0

    def stop(self) -> None:
        self.engine.stop()
        self.registry.stop()


def engine_args(model_dir: Path, registry: str | None, *extra: str) -> list[str]:
    args = ["engine", "serve", "--model", str(model_dir), "--base-model", BASE_MODEL, "--listen", "127.0.0.1:0"]
    args += ["--http-listen", "127.0.0.1:0"]
    args += ["--registry", registry] if registry else []
    return [*args, "--metrics-port", "0", "--kv-cache-bytes", str(4 * 1024 * 1024), *extra]


async def push(address: str, name: str, folder: Path, base_model: str = BASE_MODEL, alias: str = "") -> str:
    async with RegistryClient(address) as client:
        try:
            await client.get_adapter(name)
        except Exception:
            await client.create_adapter(name, base_model)
        config, weights = read_adapter(folder)
        version = await client.upload(name, config, weights)
        if alias:
            await client.set_alias(name, alias, version.version)
        return str(version.digest)


async def register(address: str, model_dir: Path, name: str = BASE_MODEL) -> None:
    async with RegistryClient(address) as client:
        await client.register_base_model(name, (model_dir / "config.json").read_text())


def start_stack(model_dir: Path, tmp: Path, engine_extra: Sequence[str] = (), backend: object | None = None) -> Stack:
    if backend is None:
        reg = start_server(registry_args(f"sqlite:///{tmp}/registry.db", f"file://{tmp}/blobs"))
    else:
        reg = start_server(backend_registry_args(backend))
    asyncio.run(register(reg.address, model_dir))
    eng = start_server(engine_args(model_dir, reg.address, *engine_extra), timeout=180)
    return Stack(registry=reg, engine=eng, model_dir=model_dir)


def stream_request(
    adapter: str, prompt: list[int], max_new_tokens: int = 8, **response: bool
) -> epb.GenerateStreamRequest:
    return epb.GenerateStreamRequest(
        adapter=adapter,
        token_ids=epb.TokenIds(ids=prompt),
        stopping=epb.StoppingCriteria(max_new_tokens=max_new_tokens),
        response=epb.ResponseOptions(token_ids=True, **response),
    )


@dataclass
class Streamed:
    token_ids: list[int]
    text: str
    finish: int
    adapter: epb.ResolvedAdapter | None
    messages: int


async def collect(stub: epb_grpc.EngineServiceStub, request: epb.GenerateStreamRequest, **kw: object) -> Streamed:
    ids: list[int] = []
    text: list[str] = []
    finish = 0
    adapter = None
    count = 0
    async for message in stub.GenerateStream(request, **kw):
        count += 1
        if message.HasField("adapter"):
            adapter = message.adapter
        ids += [t.id for t in message.tokens]
        text.append(message.text)
        finish = message.finish_reason
    return Streamed(ids, "".join(text), finish, adapter, count)


def engine_stub(target: Stack | str) -> tuple[grpc.aio.Channel, epb_grpc.EngineServiceStub]:
    """A channel and stub to a stack's engine, or to an engine address."""
    address = target if isinstance(target, str) else target.engine.address
    channel = grpc.aio.insecure_channel(address)
    return channel, epb_grpc.EngineServiceStub(channel)
