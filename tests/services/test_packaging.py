"""Installed layout: everything under ``loraplex.*``, no generic top-level modules, one console script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str, cwd: Path) -> str:
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True)
    return result.stdout.strip()


def test_top_level_folders_import_only_under_loraplex(tmp_path: Path) -> None:
    # From an unrelated folder, the way a user's program sees the environment.
    out = _run(
        "import importlib.util as u\n"
        "print([n for n in ('engine', 'registry', 'kernels', 'services') if u.find_spec(n)])\n"
        "import loraplex.engine, loraplex.registry, loraplex.kernels, loraplex.services\n"
        "print('ok')",
        tmp_path,
    )
    assert out.splitlines() == ["[]", "ok"]


def test_registry_imports_without_torch(tmp_path: Path) -> None:
    out = _run(
        "import sys\n"
        "import loraplex.registry.service, loraplex.registry.client, loraplex.services.registry_app\n"
        "print('torch' in sys.modules)",
        tmp_path,
    )
    assert out == "False"


def test_console_script_exists() -> None:
    script = Path(sys.executable).parent / "loraplex"
    assert script.exists()
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "registry" in result.stdout and "adapters" in result.stdout


def test_readme_settings_tables_are_current() -> None:
    from loraplex.services.settings import ClientSettings, EngineSettings, RegistrySettings, settings_table

    readme = (ROOT / "README.md").read_text()
    for cls in (RegistrySettings, ClientSettings, EngineSettings):
        assert settings_table(cls) in readme, f"README's {cls.__name__} table is stale: paste settings_table() output"
