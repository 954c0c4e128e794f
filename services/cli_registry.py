"""CLI handlers for ``registry``, ``models`` and ``adapters`` subcommands.

Every handler reports through ``cli_output.emit``: with ``--json`` exactly one JSON document on stdout, otherwise
human lines; progress and side notes go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
from pathlib import Path

from loraplex.registry.client import RegistryClient
from loraplex.registry.errors import FailedPrecondition, InvalidArgument, NotFound
from loraplex.registry.refs import parse_ref
from loraplex.services.cli_output import emit, progress
from loraplex.services.settings import ClientSettings, RegistrySettings, from_sources

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PARTIAL_SUFFIX = ".partial"


def _client(args: argparse.Namespace) -> RegistryClient:
    s = from_sources(ClientSettings, args)
    return RegistryClient(s.registry, s.token, s.timeout)


def _labels(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise InvalidArgument(f"--label {pair!r} must be key=value")
        out[key] = value
    return out


def _human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


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
    verb = "would remove" if args.dry_run else "removed"
    value = dataclasses.asdict(report) | {
        "dry_run": bool(args.dry_run),
        "removed_count": report.removed_count,
        "removed_bytes": report.removed_bytes,
    }
    lines = [
        f"gc: {verb} {report.removed_count} item(s), {_human_bytes(report.removed_bytes)}: "
        f"{len(report.deleted)} orphan blob(s) ({_human_bytes(report.deleted_bytes)}), "
        f"{report.spool_files_deleted} staged upload(s) ({_human_bytes(report.spool_bytes)}), "
        f"{report.temp_files_deleted} temp file(s) and {report.multipart_uploads_aborted} incomplete multipart "
        f"upload(s) ({_human_bytes(report.incomplete_bytes)}); kept {report.kept_recent} recent, "
        f"{report.referenced} referenced",
        *(f"  {key}" for key in report.deleted),
    ]
    emit(args, value, lines)
    return 0


async def migrate(args: argparse.Namespace) -> int:
    from loraplex.services.registry_app import build_service

    build_service(from_sources(RegistrySettings, args))
    emit(args, {"migrated": True}, "database is at the latest schema")
    return 0


# -- models --------------------------------------------------------------------------------------------
async def models_register(args: argparse.Namespace) -> int:
    config_path = Path(args.dir) / "config.json"
    if not config_path.is_file():
        raise InvalidArgument(f"{config_path} not found: pass a Hugging Face model folder")
    async with _client(args) as client:
        model = await client.register_base_model(args.name, config_path.read_text())
    shape = f"{model.architecture}, {model.num_hidden_layers} layers, hidden {model.hidden_size}"
    emit(args, model, f"registered {model.name} ({shape})")
    return 0


async def models_list(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        models = await client.list_base_models()
    lines = [
        f"{m.name}\t{m.architecture}\tlayers={m.num_hidden_layers}\thidden={m.hidden_size}\tvocab={m.vocab_size}"
        for m in models
    ]
    emit(args, models, lines)
    return 0


# -- adapters ------------------------------------------------------------------------------------------
async def adapters_push(args: argparse.Namespace) -> int:
    folder = Path(args.dir)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
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
        with progress() as bar:
            task = bar.add_task(f"push {args.name}", total=size)
            version = await client.upload(
                args.name,
                config_path.read_text(),
                weights_path,
                request_id=args.request_id,
                on_progress=lambda done, total: bar.update(task, completed=done),
            )
        for alias in args.alias:
            await client.set_alias(args.name, alias, version.version)
            version.aliases.append(alias)
    summary = f"{version.digest} ({version.size_bytes} bytes, rank {version.rank})"
    emit(args, version, f"pushed {version.adapter}@{version.version} {summary}")
    return 0


async def adapters_list(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        adapters = await client.list_adapters(args.base_model, args.namespace, _labels(args.label))
    lines = []
    for a in adapters:
        latest = a.latest_version if a.HasField("latest_version") else "-"
        aliases = ",".join(f"{k}->{v}" for k, v in sorted(a.aliases.items()))
        lines.append(f"{a.name}\tbase={a.base_model}\tlatest={latest}\taliases={aliases or '-'}")
    emit(args, adapters, lines)
    return 0


async def adapters_versions(args: argparse.Namespace) -> int:
    """Every version of one adapter, newest first."""
    async with _client(args) as client:
        versions = await client.list_versions(args.name)
    lines = [
        f"{v.adapter}@{v.version}\t{v.digest[:19]}…\t{v.size_bytes} bytes\trank={v.rank}\t"
        f"aliases={','.join(v.aliases) or '-'}"
        for v in versions
    ]
    emit(args, versions, lines)
    return 0


async def adapters_show(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        version = await client.resolve(args.ref)
    emit(
        args,
        version,
        f"{version.adapter}@{version.version}\n  digest   {version.digest}\n  size     {version.size_bytes}\n"
        f"  rank     {version.rank} (alpha {version.lora_alpha:g}{', rsLoRA' if version.use_rslora else ''})\n"
        f"  modules  {', '.join(version.target_modules)}\n  dtype    {version.dtype}\n  base     {version.base_model}\n"
        f"  aliases  {', '.join(version.aliases) or '-'}",
    )
    return 0


def _ready_folder(folder: Path, partial: Path, force: bool) -> None:
    """The target folder may be new, empty, or hold only this pull's partial file; else ``--force`` is needed."""
    if folder.exists() and not folder.is_dir():
        raise FailedPrecondition(f"{folder} exists and is not a folder", reason="FOLDER_NOT_EMPTY")
    if folder.is_dir() and not force:
        others = sorted(p.name for p in folder.iterdir() if p != partial)
        if others:
            raise FailedPrecondition(
                f"{folder} is not empty ({', '.join(others[:3])}{', …' if len(others) > 3 else ''}): "
                "pass --force to overwrite the adapter files in it",
                reason="FOLDER_NOT_EMPTY",
            )
    folder.mkdir(parents=True, exist_ok=True)


async def adapters_pull(args: argparse.Namespace) -> int:
    """Stream a version into a PEFT folder; an interrupted pull of the same content resumes where it stopped."""
    folder = Path(args.dir)
    async with _client(args) as client:
        version = await client.resolve(args.ref)
        # Pin the content: a resumed pull must continue the same bytes even if an alias moved meanwhile.
        pinned = f"{version.adapter}@{version.digest}"
        partial = folder / f".{WEIGHTS_FILE}.{version.weights_sha256[:16]}{PARTIAL_SUFFIX}"
        _ready_folder(folder, partial, args.force)
        if partial.exists() and partial.stat().st_size > version.size_bytes:
            partial.unlink()
        with progress() as bar:
            task = bar.add_task(f"pull {args.ref}", total=version.size_bytes)
            await client.download_to(
                pinned, partial, on_progress=lambda done, total: bar.update(task, completed=done, total=total)
            )
    (folder / CONFIG_FILE).write_text(version.adapter_config_json)
    os.replace(partial, folder / WEIGHTS_FILE)
    emit(args, version, f"pulled {version.adapter}@{version.version} into {folder}")
    return 0


async def adapters_alias(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        version = await client.resolve(args.ref)
        adapter = await client.set_alias(version.adapter, args.alias, version.version)
    emit(args, adapter, f"{adapter.name}@{args.alias} -> {version.version}")
    return 0


async def adapters_unalias(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        adapter = await client.delete_alias(args.name, args.alias)
    emit(args, adapter, f"deleted alias {args.name}@{args.alias}")
    return 0


async def adapters_update(args: argparse.Namespace) -> int:
    """Change the description and/or labels; labels are merged here and written back under the read etag."""
    if args.description is None and not args.label and not args.remove_label:
        raise InvalidArgument("nothing to update: pass --description, --label or --remove-label")
    async with _client(args) as client:
        current = await client.get_adapter(args.name)
        labels = None
        if args.label or args.remove_label:
            labels = {k: v for k, v in current.labels.items() if k not in set(args.remove_label)}
            labels |= _labels(args.label)
        adapter = await client.update_adapter(args.name, description=args.description, labels=labels, etag=current.etag)
    shown = ", ".join(f"{k}={v}" for k, v in sorted(adapter.labels.items())) or "-"
    emit(args, adapter, f"updated {adapter.name}: labels {shown}; description {adapter.description!r}")
    return 0


async def adapters_delete(args: argparse.Namespace) -> int:
    ref = parse_ref(args.ref)
    async with _client(args) as client:
        if ref.selector_kind == "latest" and "@" not in args.ref:
            await client.delete_adapter(ref.name, force=args.force)
            emit(args, {"deleted": {"adapter": ref.name}}, f"deleted adapter {ref.name}")
            return 0
        version = await client.resolve(args.ref)
        await client.delete_version(version.adapter, version.version)
    value = {"deleted": {"adapter": version.adapter, "version": version.version, "digest": version.digest}}
    emit(args, value, f"deleted {version.adapter}@{version.version}")
    return 0
