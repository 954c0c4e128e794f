"""Per-call context shared by servers and clients: the request id that ties log lines across services.

Why in ``registry/`` (torch-free, imported by everyone): the server interceptor sets it, every log line reads it,
and ``RegistryClient`` forwards it as ``x-request-id`` so a failure relayed by the engine from the registry
carries the caller's id on both sides.
"""

from __future__ import annotations

import contextvars
import uuid

UNSET = "-"
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("loraplex_request_id", default=UNSET)


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]
