"""Typed domain errors shared by the registry and the engine.

Why here: the engine imports the registry (never the reverse) and the registry must stay torch-free, so the
one hierarchy of failures both raise lives in this small module. Domain code raises these; ``code`` names the
gRPC status each class maps to (the one table, read by ``loraplex.services.errors`` on the server and by
``loraplex.registry.client`` to turn a status back into the same class), and ``reason`` becomes the
``google.rpc.ErrorInfo`` reason (UPPER_SNAKE_CASE, domain ``loraplex.dev``).
"""

from __future__ import annotations

from collections.abc import Mapping


class LoraplexError(Exception):
    """Base class: a failure a caller can act on. ``reason`` is stable and machine-readable.

    ``message`` goes to the caller; ``detail`` never does. Why the split: the cause of an infrastructure failure
    (a driver's or botocore's text) names database hosts and ports, DSNs and S3 URLs, which are nobody's business
    outside the server. Servers log ``detail`` with the request id; callers get ``message`` and that id.
    """

    reason: str = "INTERNAL"
    code: str = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        detail: str = "",
    ):
        super().__init__(message)
        self.message = message
        self.detail = detail
        if reason is not None:
            self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidArgument(LoraplexError):
    """The request itself is malformed (bad name, bad parameter, bad field mask)."""

    reason = "INVALID_ARGUMENT"
    code = "INVALID_ARGUMENT"


class InvalidAdapter(InvalidArgument):
    """Uploaded adapter files are not a valid PEFT LoRA adapter (header, keys, shapes, dtypes, sizes)."""

    reason = "INVALID_ADAPTER"


class NotFound(LoraplexError):
    reason = "NOT_FOUND"
    code = "NOT_FOUND"


class AdapterNotFound(NotFound):
    reason = "ADAPTER_NOT_FOUND"


class BaseModelNotFound(NotFound):
    reason = "BASE_MODEL_NOT_FOUND"


class VersionNotFound(NotFound):
    reason = "VERSION_NOT_FOUND"


class AliasNotFound(NotFound):
    reason = "ALIAS_NOT_FOUND"


class AlreadyExists(LoraplexError):
    reason = "ALREADY_EXISTS"
    code = "ALREADY_EXISTS"


class Conflict(LoraplexError):
    """Optimistic concurrency lost (etag mismatch): the caller should re-read and retry."""

    reason = "ETAG_MISMATCH"
    code = "ABORTED"


class FailedPrecondition(LoraplexError):
    reason = "FAILED_PRECONDITION"
    code = "FAILED_PRECONDITION"


class AdapterIncompatible(FailedPrecondition):
    """The adapter does not fit the base model (shapes, architecture, rank over a limit)."""

    reason = "ADAPTER_INCOMPATIBLE"


class ResourceExhausted(LoraplexError):
    reason = "RESOURCE_EXHAUSTED"
    code = "RESOURCE_EXHAUSTED"


class QueueFull(ResourceExhausted):
    reason = "QUEUE_FULL"


class Unavailable(LoraplexError):
    """A dependency (registry, database, blob store) cannot be reached right now; retrying may help."""

    reason = "UNAVAILABLE"
    code = "UNAVAILABLE"


class Unauthenticated(LoraplexError):
    reason = "UNAUTHENTICATED"
    code = "UNAUTHENTICATED"


class PermissionDenied(LoraplexError):
    reason = "PERMISSION_DENIED"
    code = "PERMISSION_DENIED"


class DeadlineExceeded(LoraplexError):
    reason = "DEADLINE_EXCEEDED"
    code = "DEADLINE_EXCEEDED"


class Cancelled(LoraplexError):
    reason = "CANCELLED"
    code = "CANCELLED"


# The base class per status code, for turning a received status back into a domain error.
ERROR_FOR_CODE: dict[str, type[LoraplexError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        Conflict,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
        Unauthenticated,
        PermissionDenied,
        DeadlineExceeded,
        Cancelled,
    )
}


def error_from_status(
    code_name: str, message: str, reason: str = "", metadata: Mapping[str, str] | None = None
) -> LoraplexError:
    """Rebuild the domain error a peer raised from its status code name and ErrorInfo reason."""
    cls = ERROR_FOR_CODE.get(code_name, LoraplexError)
    cls = next((sub for sub in _subclasses(cls) if sub.reason == reason), cls)
    return cls(message, reason=reason or None, metadata=metadata)


def _subclasses(cls: type[LoraplexError]) -> list[type[LoraplexError]]:
    found: list[type[LoraplexError]] = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found
