"""Structured (JSON-lines) logging with a request id carried in a context variable.

Why a context variable: the id is set once by the RPC interceptor and every log line emitted while serving
that RPC — in servicers, stores, the engine's submit path — carries it without threading it through calls.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from loraplex.registry.context import new_request_id, request_id_var

__all__ = ["JsonFormatter", "configure_logging", "new_request_id", "request_id_var"]

_STANDARD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, and any ``extra=`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": request_id_var.get(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                payload[key] = value
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def configure_logging(level: str = "info", json_lines: bool = True) -> None:
    """Route loraplex logs to stderr; idempotent so tests and the CLI can both call it."""
    root = logging.getLogger("loraplex")
    root.setLevel(level.upper())
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.propagate = False
