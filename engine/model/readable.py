"""Check, before anything is parsed, that this process may read every file of the model folder.

Why a separate first check: in a container the engine runs as an unprivileged user (uid 10001) over a folder
mounted from the host, where safetensors writes 0600 files owned by whoever trained the model. Without this
check the failure surfaces deep in a loader as a bare ``PermissionError`` traceback for one file; here it is one
``MODEL_LOAD_FAILED`` line naming every unreadable file, its mode and owner, and the fix.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from loraplex.engine.model.errors import ModelLoadError

# What the loader opens: config, tokenizer files, weights and shard indexes. Other files (README, images) are
# never read, so their modes do not matter.
_READ_SUFFIXES = (".json", ".safetensors", ".model", ".txt", ".jinja")
_SHOWN = 5


def _describe(path: Path) -> str:
    info = path.stat()
    return f"{path.name} (mode {stat.S_IMODE(info.st_mode):04o}, owner uid {info.st_uid})"


def check_model_folder_readable(model_dir: Path) -> None:
    """Raise ``ModelLoadError`` unless ``model_dir`` is a folder this process can list and whose model files it
    can open for reading.

    ``os.access`` alone is not trusted (it answers for the real uid and ignores some ACL and mount setups), so
    each file is also opened; nothing is read.
    """
    if not model_dir.exists():
        raise ModelLoadError(f"model folder {model_dir} does not exist (in compose: set LORAPLEX_MODEL_DIR)")
    if not model_dir.is_dir():
        raise ModelLoadError(f"model folder {model_dir} is not a folder")
    try:
        entries = sorted(p for p in model_dir.iterdir() if p.is_file() and p.name.endswith(_READ_SUFFIXES))
    except PermissionError:
        raise ModelLoadError(
            f"model folder {model_dir} ({_describe(model_dir)}) cannot be listed by uid {os.getuid()}; "
            f"make it readable, e.g. chmod a+rx {model_dir}"
        ) from None
    if not entries and not any(model_dir.iterdir()):
        raise ModelLoadError(
            f"model folder {model_dir} is empty, config.json not found "
            "(in compose: LORAPLEX_MODEL_DIR must name the host folder of the model)"
        )
    unreadable = []
    for path in entries:
        try:
            with path.open("rb"):
                pass
        except PermissionError:
            unreadable.append(_describe(path))
    if unreadable:
        more = len(unreadable) - _SHOWN
        shown = ", ".join(unreadable[:_SHOWN]) + (f" and {more} more" if more > 0 else "")
        raise ModelLoadError(
            f"model folder {model_dir}: uid {os.getuid()} cannot read {shown}; make the files readable "
            f"(chmod -R a+rX {model_dir}) or run the engine as their owner"
        )
