"""What the CLI prints: one JSON document on stdout with ``--json``, human text otherwise, progress on stderr.

Why one module: scripts pipe ``--json`` output into ``jq``, so stdout must carry exactly that document — progress
bars and notes go to stderr — and numbers must be JSON numbers. The proto3 JSON mapping writes 64-bit integers as
strings (a JavaScript-safety rule); versions, sizes and ranks are numbers to a script, so they are printed as such.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn


def message_json(message: Message) -> dict[str, Any]:
    """Proto field names, every field present (scripts see every key), 64-bit integers as JSON numbers."""
    return MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        unquote_int64_if_possible=True,  # as numbers up to 2**53 (every real count and size): past that, strings
    )


def jsonable(value: Any) -> Any:
    """Messages (and lists/dicts of them) as plain JSON values."""
    if isinstance(value, Message):
        return message_json(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [jsonable(v) for v in value]
    return value


def wants_json(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False))


def emit(args: argparse.Namespace, value: Any, text: str | Sequence[str]) -> None:
    """The command's one result: ``value`` as one JSON document with ``--json``, else ``text`` (lines)."""
    if wants_json(args):
        print(json.dumps(jsonable(value), indent=2, sort_keys=True, default=str))
        return
    lines = [text] if isinstance(text, str) else list(text)
    for line in lines:
        print(line)


def note(text: str) -> None:
    """A side message (never part of the result): stderr, so stdout stays parseable."""
    print(text, file=sys.stderr)


def progress() -> Progress:
    """A transfer bar on stderr, drawn only when stderr is a terminal (logs and pipes get nothing)."""
    console = Console(stderr=True)
    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=console,
        disable=not console.is_terminal,
        transient=True,
    )
