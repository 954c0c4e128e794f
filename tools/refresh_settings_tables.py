"""Rewrite the settings tables in README.md and docs/operations.md from the settings classes (``make docs``).

Each table is found by its header row followed by rows of that class's flags, and replaced whole; tests check
that the files hold exactly ``settings_table(cls)`` for every class.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from loraplex.services.settings import ClientSettings, EngineSettings, RegistrySettings, settings_table

ROOT = Path(__file__).resolve().parent.parent
HEADER = "| flag | env | default | meaning |"


def refresh(text: str) -> str:
    lines = text.split("\n")
    for cls in (RegistrySettings, ClientSettings, EngineSettings):
        first_flag = "| `--" + dataclasses.fields(cls)[0].name.replace("_", "-") + "`"
        for i, line in enumerate(lines):
            if line == HEADER and i + 2 < len(lines) and lines[i + 2].startswith(first_flag):
                end = i + 2
                while end < len(lines) and lines[end].startswith("| `--"):
                    end += 1
                lines[i:end] = settings_table(cls).split("\n")
                break
    return "\n".join(lines)


def main() -> None:
    for rel in ("README.md", "docs/operations.md"):
        path = ROOT / rel
        path.write_text(refresh(path.read_text()))


if __name__ == "__main__":
    main()
