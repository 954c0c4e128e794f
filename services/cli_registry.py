"""CLI handlers for ``registry``, ``models`` and ``adapters`` subcommands."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from loraplex.registry.client import RegistryClient
from loraplex.registry.errors import InvalidArgument, NotFound
from loraplex.registry.refs import parse_ref
from loraplex.services.settings import ClientSettings, RegistrySettings, from_sources


def _client(args: argparse.Namespace) -> RegistryClient:
    s = from_sources(ClientSettings, args)
    return RegistryClient(s.registry, s.token, s.timeout)


def _emit(args: argparse.Namespace, message: Any, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(MessageToDict(message, preserving_proto_field_name=True), indent=2, sort_keys=True))
    else:
        print(text)


def _labels(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise InvalidArgument(f"label {pair!r} must be key=value")
        out[key] = value
    return out


def _print_json_list(messages: Sequence[Message]) -> None:
    print(json.dumps([MessageToDict(m, preserving_proto_field_name=True) for m in messages], indent=2))


def _progress() -> Progress:
    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        transient=not sys.stderr.isatty(),
    )


# -- registry ------------------------------------------------------------------------------------------
async def serve(args: argparse.Namespace) -> int:
    from loraplex.services.logs import configure_logging
    from loraplex.services.registry_app import serve_registry

    settings = from_sources(RegistrySettings, args)
    configure_logging(settings.log_level)
    await serve_registry(settings)
    return 0


async def gc(args: argparse.Namespace) -> int:
    from loraplex.services.registry_app import build_service

    settings = from_sources(RegistrySettings, args)
    report = await asyncio.to_thread(build_service(settings).gc, settings.gc_grace_seconds, args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    print(
        f"gc: {verb} {len(report.deleted)} orphan blob(s); "
        f"kept {report.kept_recent} recent; {report.referenced} referenced"
    )
    for key in report.deleted:
        print(f"  {key}")
    return 0


async def migrate(args: argparse.Namespace) -> int:
    from loraplex.services.registry_app import build_service

    build_service(from_sources(RegistrySettings, args))
    print("database is at the latest schema")
    return 0


# -- models --------------------------------------------------------------------------------------------
async def models_register(args: argparse.Namespace) -> int:
    config_path = Path(args.dir) / "config.json"
    if not config_path.is_file():
        raise InvalidArgument(f"{config_path} not found: pass a Hugging Face model folder")
    async with _client(args) as client:
        model = await client.register_base_model(args.name, config_path.read_text())
    _emit(
        args,
        model,
        f"registered {model.name} ({model.architecture}, {model.num_hidden_layers} layers, hidden {model.hidden_size})",
    )
    return 0


async def models_list(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        models = await client.list_base_models()
    if args.json:
        _print_json_list(models)
        return 0
    for m in models:
        print(f"{m.name}\t{m.architecture}\tlayers={m.num_hidden_layers}\thidden={m.hidden_size}\tvocab={m.vocab_size}")
    return 0


# -- adapters ------------------------------------------------------------------------------------------
async def adapters_push(args: argparse.Namespace) -> int:
    folder = Path(args.dir)
    config_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise InvalidArgument(f"{path} not found: pass a PEFT adapter folder (save_pretrained output)")
    async with _client(args) as client:
        try:
            await client.get_adapter(args.name)
        except NotFound:
            if not args.base_model:
                raise InvalidArgument(
                    f"adapter {args.name} does not exist yet: pass --base-model to create it"
                ) from None
            await client.create_adapter(args.name, args.base_model, args.description, _labels(args.label))
        size = weights_path.stat().st_size
        with _progress() as progress:
            task = progress.add_task(f"push {args.name}", total=size)
            version = await client.upload(
                args.name,
                config_path.read_text(),
                weights_path,
                request_id=args.request_id,
                on_progress=lambda done, total: progress.update(task, completed=done),
            )
        for alias in args.alias:
            await client.set_alias(args.name, alias, version.version)
            version.aliases.append(alias)
    _emit(
        args,
        version,
        f"pushed {version.adapter}@{version.version} {version.digest} "
        f"({version.size_bytes} bytes, rank {version.rank})",
    )
    return 0


async def adapters_list(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        adapters = await client.list_adapters(args.base_model, args.namespace, _labels(args.label))
    if args.json:
        _print_json_list(adapters)
        return 0
    for a in adapters:
        latest = a.latest_version if a.HasField("latest_version") else "-"
        aliases = ",".join(f"{k}->{v}" for k, v in sorted(a.aliases.items()))
        print(f"{a.name}\tbase={a.base_model}\tlatest={latest}\taliases={aliases or '-'}")
    return 0


async def adapters_show(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        version = await client.resolve(args.ref)
    _emit(
        args,
        version,
        f"{version.adapter}@{version.version}\n  digest   {version.digest}\n  size     {version.size_bytes}\n"
        f"  rank     {version.rank} (alpha {version.lora_alpha:g}{', rsLoRA' if version.use_rslora else ''})\n"
        f"  modules  {', '.join(version.target_modules)}\n  dtype    {version.dtype}\n  base     {version.base_model}\n"
        f"  aliases  {', '.join(version.aliases) or '-'}",
    )
    return 0


async def adapters_pull(args: argparse.Namespace) -> int:
    folder = Path(args.dir)
    async with _client(args) as client:
        with _progress() as progress:
            task = progress.add_task(f"pull {args.ref}", total=None)
            result = await client.download(
                args.ref, on_progress=lambda done, total: progress.update(task, completed=done, total=total)
            )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(result.version.adapter_config_json)
    (folder / "adapter_model.safetensors").write_bytes(result.weights)
    v = result.version
    _emit(args, v, f"pulled {v.adapter}@{v.version} into {folder}")
    return 0


async def adapters_alias(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        version = await client.resolve(args.ref)
        adapter = await client.set_alias(version.adapter, args.alias, version.version)
    _emit(args, adapter, f"{adapter.name}@{args.alias} -> {version.version}")
    return 0


async def adapters_delete(args: argparse.Namespace) -> int:
    ref = parse_ref(args.ref)
    async with _client(args) as client:
        if ref.selector_kind == "latest" and "@" not in args.ref:
            await client.delete_adapter(ref.name, force=args.force)
            print(f"deleted adapter {ref.name}")
            return 0
        version = await client.resolve(args.ref)
        await client.delete_version(version.adapter, version.version)
    print(f"deleted {version.adapter}@{version.version}")
    return 0
