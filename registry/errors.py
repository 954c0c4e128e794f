"""Typed domain errors shared by the registry and the engine.

Why here: the engine imports the registry (never the reverse) and the registry must stay torch-free, so the
one hierarchy of failures both raise lives in this small module. Domain code raises these and knows nothing of
gRPC; ``loraplex.services.errors`` maps each class to a status code, and ``reason`` becomes the
``google.rpc.ErrorInfo`` reason (UPPER_SNAKE_CASE, domain ``loraplex.dev``).
"""

from __future__ import annotations

from collections.abc import Mapping


class LoraplexError(Exception):
    """Base class: a failure a caller can act on. ``reason`` is stable and machine-readable."""

    reason: str = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None, metadata: Mapping[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidArgument(LoraplexError):
    """The request itself is malformed (bad name, bad parameter, bad field mask)."""

    reason = "INVALID_ARGUMENT"


class InvalidAdapter(InvalidArgument):
    """Uploaded adapter files are not a valid PEFT LoRA adapter (header, keys, shapes, dtypes, sizes)."""

    reason = "INVALID_ADAPTER"


class NotFound(LoraplexError):
    reason = "NOT_FOUND"


class AdapterNotFound(NotFound):
    reason = "ADAPTER_NOT_FOUND"


class BaseModelNotFound(NotFound):
    reason = "BASE_MODEL_NOT_FOUND"


class AlreadyExists(LoraplexError):
    reason = "ALREADY_EXISTS"


class Conflict(LoraplexError):
    """Optimistic concurrency lost (etag mismatch): the caller should re-read and retry."""

    reason = "ETAG_MISMATCH"


class FailedPrecondition(LoraplexError):
    reason = "FAILED_PRECONDITION"


class AdapterIncompatible(FailedPrecondition):
    """The adapter does not fit the base model (shapes, architecture, rank over a limit)."""

    reason = "ADAPTER_INCOMPATIBLE"


class ResourceExhausted(LoraplexError):
    reason = "RESOURCE_EXHAUSTED"


class QueueFull(ResourceExhausted):
    reason = "QUEUE_FULL"


class Unavailable(LoraplexError):
    """A dependency (registry, database, blob store) cannot be reached right now; retrying may help."""

    reason = "UNAVAILABLE"


class Unauthenticated(LoraplexError):
    reason = "UNAUTHENTICATED"


class PermissionDenied(LoraplexError):
    reason = "PERMISSION_DENIED"


class DeadlineExceeded(LoraplexError):
    reason = "DEADLINE_EXCEEDED"


class Cancelled(LoraplexError):
    reason = "CANCELLED"
