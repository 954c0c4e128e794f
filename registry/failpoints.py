"""Crash-injection points for crash-safety tests (``LORAPLEX_FAILPOINT=<name>`` kills the process there).

Why a real process exit: the property under test is "a registry killed between blob and metadata leaves no
visible version", which only a hard exit (no cleanup, no finally blocks) demonstrates honestly. Unset in
production, each check is one environment lookup.
"""

from __future__ import annotations

import os

FAILPOINT_ENV = "LORAPLEX_FAILPOINT"
FAILPOINT_EXIT_CODE = 70


def failpoint(name: str) -> None:
    """Exit the process immediately if the environment selects the failpoint ``name``."""
    if os.environ.get(FAILPOINT_ENV) == name:
        os._exit(FAILPOINT_EXIT_CODE)
