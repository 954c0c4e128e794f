"""The one exception type for a model that cannot be loaded."""

from __future__ import annotations

from loraplex.registry.errors import FailedPrecondition


class ModelLoadError(FailedPrecondition):
    """The model folder cannot be served: unsupported architecture, missing file, missing or misshapen tensor.

    A ``FailedPrecondition`` because the request (start serving this folder) is well formed but the state of
    the folder makes it impossible; the message always names the offending file, field or tensor.
    """

    reason = "MODEL_LOAD_FAILED"
