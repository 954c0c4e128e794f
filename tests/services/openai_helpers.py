"""In-process engines with the OpenAI HTTP API on loopback free ports, a registry beside them, and the PEFT oracle.

Why in-process: one event loop runs the registry, the engine (gRPC + HTTP) and the ``openai`` client, so tests
start in about a second and can read ``engine.stats()`` directly; tests/e2e/test_openai_e2e.py covers the
subprocess path.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import torch

from loraplex.registry.client import RegistryClient
from loraplex.services.engine_app import EngineApp
from loraplex.services.registry_app import start_registry
from loraplex.services.server import ServerHandle
from loraplex.services.settings import EngineSettings, RegistrySettings
from tests.engine.helpers import peft_model, until_eos
from tests.fixtures.hf import ADAPTER_ZOO, build_adapter, read_adapter

BASE_MODEL = "tiny-llama"
EOS = 1
ADMIN, ACME, BETA = "admin-t", "acme-t", "beta-t"
TOKENS = {
    "tokens": [
        {"name": "admin", "token": ADMIN, "namespaces": ["*"], "scopes": ["admin"]},
        {"name": "acme", "token": ACME, "namespaces": ["acme"], "scopes": ["read"]},
        {"name": "beta", "token": BETA, "namespaces": ["beta"], "scopes": ["read"]},
    ]
}
# A Llama-3-style template: BOS, role headers, end-of-turn markers, the assistant header as generation prompt.
LLAMA3_STYLE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@dataclass
class Served:
    app: EngineApp
    model_dir: Path
    registry: ServerHandle | None = None
    adapters: dict[str, Path] = field(default_factory=dict)  # adapter name -> its PEFT folder
    pushed: dict[str, str] = field(default_factory=dict)  # adapter name -> digest

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.app.http_port}"

    def client(self, token: str = ADMIN) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key=token, max_retries=0, timeout=60)


def build_zoo(model_dir: Path, out: Path, names: tuple[str, ...]) -> dict[str, Path]:
    """PEFT adapters from the test zoo for this model only (cheaper than the session-wide zoo of every model)."""
    return {name: build_adapter(model_dir, out / name, ADAPTER_ZOO[name]) for name in names}


def model_with_template(source: Path, dest: Path, template: str | None = LLAMA3_STYLE) -> Path:
    """A copy of a tiny model folder whose tokenizer_config.json carries ``template``."""
    shutil.copytree(source, dest)
    if template is not None:
        path = dest / "tokenizer_config.json"
        doc = json.loads(path.read_text())
        doc["chat_template"] = template
        path.write_text(json.dumps(doc))
    return dest


async def serve(
    model_dir: Path, tmp: Path, adapters: dict[str, Path] | None = None, auth: bool = False, **engine: Any
) -> Served:
    """An engine (gRPC + HTTP on free ports); with ``adapters``, a registry holding them as ``acme/<name>``."""
    tokens_file = None
    if auth:
        tokens_file = tmp / "tokens.json"
        tokens_file.write_text(json.dumps(TOKENS))
    registry = None
    pushed: dict[str, str] = {}
    if adapters is not None:
        registry = await start_registry(
            RegistrySettings(
                listen="127.0.0.1:0",
                db=f"sqlite:///{tmp}/registry.db",
                blobs=f"file://{tmp}/blobs",
                spool_dir=str(tmp / "spool"),
                tokens_file=str(tokens_file) if tokens_file else None,
            )
        )
        async with RegistryClient(f"127.0.0.1:{registry.port}", ADMIN if auth else None) as client:
            await client.register_base_model(BASE_MODEL, (model_dir / "config.json").read_text())
            for name, folder in adapters.items():
                await client.create_adapter(f"acme/{name}", BASE_MODEL)
                config, weights = read_adapter(folder)
                pushed[name] = str((await client.upload(f"acme/{name}", config, weights)).digest)
    settings = EngineSettings(
        model=str(model_dir),
        base_model=BASE_MODEL,
        registry=f"127.0.0.1:{registry.port}" if registry else "",
        listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        tokens_file=str(tokens_file) if tokens_file else None,
        kv_cache_bytes=4 * 1024 * 1024,
        **engine,
    )
    app = EngineApp(settings)
    await app.start()
    return Served(app, model_dir, registry, dict(adapters or {}), pushed)


async def close(served: Served) -> None:
    await served.app.stop()
    if served.registry is not None:
        await served.registry.stop(grace=1.0)


def oracle(model_dir: Path, adapters: dict[str, Path], rows: list[tuple[str, list[int]]], new: int) -> list[list[int]]:
    """Greedy PEFT generation per row (equal prompt lengths); adapter ``__base__`` means none."""
    model = peft_model(model_dir, adapters)
    input_ids = torch.tensor([prompt for _, prompt in rows])
    with torch.no_grad():
        out = model.generate(
            input_ids, adapter_names=[n for n, _ in rows], do_sample=False, max_new_tokens=new, pad_token_id=2
        )
    return [until_eos(row[input_ids.shape[1] :].tolist(), EOS) for row in out]


def ids_of(tokens: list[str]) -> list[int]:
    """Token ids back from ``return_tokens_as_token_ids`` names (``token_id:<id>``)."""
    return [int(t.removeprefix("token_id:")) for t in tokens]


def finish_for(ids: list[int], max_tokens: int) -> str:
    return "stop" if ids and ids[-1] == EOS else "length" if len(ids) == max_tokens else "?"
