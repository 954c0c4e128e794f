"""``loraplex``: one CLI with subcommands for both services and their clients.

Why argparse and thin handlers: each handler parses flags into a settings object and calls one function
(server bootstrap, registry client); user errors print as one line with the gRPC status and reason, never a
traceback, and exit non-zero. A reader that closes the pipe early (``| head``) ends the command quietly.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from loraplex.registry.errors import LoraplexError
from loraplex.services.settings import ClientSettings, RegistrySettings, add_arguments, from_sources

Handler = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]


def _client_parser() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    add_arguments(parent, ClientSettings)
    return parent


def _json_flag() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return parent


def build_parser() -> argparse.ArgumentParser:
    from loraplex.services import cli_registry

    parser = argparse.ArgumentParser(prog="loraplex", description="Serve one base LLM with thousands of LoRA adapters.")
    top = parser.add_subparsers(dest="command", required=True)
    client = _client_parser()
    as_json = _json_flag()

    registry = top.add_parser("registry", help="run or maintain the adapter registry").add_subparsers(
        dest="action", required=True
    )
    serve = registry.add_parser("serve", help="run the registry gRPC server")
    add_arguments(serve, RegistrySettings)
    serve.set_defaults(handler=cli_registry.serve)
    gc = registry.add_parser(
        "gc",
        parents=[as_json],
        help="remove orphan blobs, stale staged uploads and interrupted writes (older than the grace period)",
    )
    add_arguments(gc, RegistrySettings)
    gc.add_argument("--dry-run", action="store_true", help="only report what would be deleted")
    gc.set_defaults(handler=cli_registry.gc)
    migrate = registry.add_parser("migrate", parents=[as_json], help="apply database migrations and exit")
    add_arguments(migrate, RegistrySettings)
    migrate.set_defaults(handler=cli_registry.migrate)

    models = top.add_parser("models", help="base models known to the registry").add_subparsers(
        dest="action", required=True
    )
    register = models.add_parser("register", parents=[client, as_json], help="register a base model from its HF folder")
    register.add_argument("dir", help="folder holding config.json")
    register.add_argument("--name", required=True, help="registry name for the model")
    register.set_defaults(handler=cli_registry.models_register)
    models_list = models.add_parser("list", parents=[client, as_json], help="list base models")
    models_list.set_defaults(handler=cli_registry.models_list)

    adapters = top.add_parser("adapters", help="push, pull and manage adapters").add_subparsers(
        dest="action", required=True
    )
    push = adapters.add_parser("push", parents=[client, as_json], help="upload a PEFT adapter folder as a new version")
    push.add_argument("dir", help="folder with adapter_config.json and adapter_model.safetensors")
    push.add_argument("--name", required=True, help="namespace/name")
    push.add_argument("--base-model", default="", help="base model (needed when the adapter does not exist yet)")
    push.add_argument("--alias", action="append", default=[], help="point this alias at the new version (repeatable)")
    push.add_argument("--description", default="", help="description when creating the adapter")
    push.add_argument("--label", action="append", default=[], help="key=value label when creating (repeatable)")
    push.add_argument("--request-id", default="", help="idempotency key: a retry returns the same version")
    push.set_defaults(handler=cli_registry.adapters_push)
    adapters_list = adapters.add_parser("list", parents=[client, as_json], help="list adapters")
    adapters_list.add_argument("--base-model", default="")
    adapters_list.add_argument("--namespace", default="")
    adapters_list.add_argument("--label", action="append", default=[], help="key=value filter (repeatable)")
    adapters_list.set_defaults(handler=cli_registry.adapters_list)
    versions = adapters.add_parser("versions", parents=[client, as_json], help="list an adapter's versions")
    versions.add_argument("name", help="namespace/name")
    versions.set_defaults(handler=cli_registry.adapters_versions)
    show = adapters.add_parser("show", parents=[client, as_json], help="resolve a reference and show that version")
    show.add_argument("ref", help="ns/name, ns/name@3, ns/name@alias or ns/name@sha256:<hex>")
    show.set_defaults(handler=cli_registry.adapters_show)
    pull = adapters.add_parser(
        "pull", parents=[client, as_json], help="download a version into a PEFT folder (resumes an interrupted pull)"
    )
    pull.add_argument("ref")
    pull.add_argument("dir")
    pull.add_argument("--force", action="store_true", help="write into a folder that is not empty")
    pull.set_defaults(handler=cli_registry.adapters_pull)
    alias = adapters.add_parser("alias", parents=[client, as_json], help="point ALIAS at the version REF resolves to")
    alias.add_argument("ref")
    alias.add_argument("alias")
    alias.set_defaults(handler=cli_registry.adapters_alias)
    unalias = adapters.add_parser("unalias", parents=[client, as_json], help="delete an alias of an adapter")
    unalias.add_argument("name", help="namespace/name")
    unalias.add_argument("alias")
    unalias.set_defaults(handler=cli_registry.adapters_unalias)
    update = adapters.add_parser("update", parents=[client, as_json], help="change an adapter's description or labels")
    update.add_argument("name", help="namespace/name")
    update.add_argument("--description", default=None, help="new description")
    update.add_argument("--label", action="append", default=[], help="set key=value (repeatable)")
    update.add_argument("--remove-label", action="append", default=[], help="remove this label key (repeatable)")
    update.set_defaults(handler=cli_registry.adapters_update)
    delete = adapters.add_parser("delete", parents=[client, as_json], help="delete a version (ns/name@N) or an adapter")
    delete.add_argument("ref")
    delete.add_argument("--force", action="store_true", help="deleting a whole adapter: also delete its versions")
    delete.set_defaults(handler=cli_registry.adapters_delete)

    demo = top.add_parser(
        "demo", help="train (once) demo adapters, serve them from the registry + engine, stream one mixed batch"
    )
    demo.add_argument("--rebuild", action="store_true", help="retrain the demo model and adapters (ignore the cache)")
    demo.set_defaults(handler=_demo)

    _add_optional_commands(top, client, as_json)
    return parser


async def _demo(args: argparse.Namespace) -> int:
    from loraplex.services.demo import demo_settings, run_demo

    return await run_demo(demo_settings(), rebuild=args.rebuild)


def _add_optional_commands(top: Any, client: argparse.ArgumentParser, as_json: argparse.ArgumentParser) -> None:
    """Commands of parts that may not be installed (the engine needs torch); absent parts add nothing."""
    try:
        from loraplex.services import cli_engine
    except ImportError:
        return
    cli_engine.add_commands(top, client, as_json)


def client_settings(args: argparse.Namespace) -> ClientSettings:
    return from_sources(ClientSettings, args)


def error_line(exc: LoraplexError) -> str:
    """One line for the user. The local detail (e.g. which address did not answer) is theirs to see."""
    detail = " ".join(exc.detail.split())
    return f"error: {exc.code} ({exc.reason}): {exc.message}" + (f" [{detail}]" if detail else "")


def _quiet_stdout() -> None:
    """stdout's reader is gone: point stdout at /dev/null so the interpreter's final flush cannot fail too."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        code = asyncio.run(handler(args))
        sys.stdout.flush()  # surface a closed pipe here, not as an "Exception ignored" at exit
    except LoraplexError as exc:
        print(error_line(exc), file=sys.stderr)
        code = 1
    except BrokenPipeError:
        _quiet_stdout()
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
