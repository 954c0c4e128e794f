"""The docs under docs/ stay true to the code: settings tables, env names, metrics, error reasons, examples.

Why: reference docs rot silently. Each table here is compared with what the code itself declares (the settings
dataclasses, the Prometheus registry, the error classes and every ``reason=`` in the source), so a change to
one without the other fails here with the line to fix.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest

from loraplex.registry import errors
from loraplex.services.engine_metrics import EngineMetrics
from loraplex.services.settings import ClientSettings, EngineSettings, RegistrySettings, settings_table

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
OPERATIONS = DOCS / "operations.md"
API = DOCS / "api.md"
SOURCE_DIRS = ("registry", "services", "engine", "kernels")
SETTINGS = {cls.__name__: cls for cls in (RegistrySettings, EngineSettings, ClientSettings)}
# Variables read outside the settings classes, each with the file that reads it.
OTHER_ENV = {"LORAPLEX_ENGINE": "services/cli_engine.py"}


def source_files() -> list[Path]:
    return [p for d in SOURCE_DIRS for p in (ROOT / d).rglob("*.py") if "v1" not in p.relative_to(ROOT).parts]


def table_after(text: str, marker: str) -> str:
    """The Markdown table that starts on the line after ``marker``."""
    lines = text.split(marker, 1)[1].lstrip("\n").splitlines()
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append(line)
    return "\n".join(rows)


def section(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0]


def table_rows(table: str) -> list[list[str]]:
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.strip().splitlines()]
    return [row for row in rows[2:]]  # drop header + separator


def unquote(cell: str) -> str:
    return cell.strip("`")


# ------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_settings_tables_equal_the_generated_ones(name: str) -> None:
    text = OPERATIONS.read_text()
    marker = f"<!-- settings-table: {name} -->"
    assert text.count(marker) == 1, f"docs/operations.md needs exactly one {marker}"
    assert table_after(text, marker) == settings_table(SETTINGS[name]), (
        f"regenerate the {name} table in docs/operations.md with loraplex.services.settings.settings_table({name})"
    )


def test_every_env_var_named_in_the_docs_exists() -> None:
    known = {
        str(f.metadata.get("env") or "LORAPLEX_" + f.name.upper())
        for cls in SETTINGS.values()
        for f in cls.__dataclass_fields__.values()
    }
    for var, path in OTHER_ENV.items():
        assert var in (ROOT / path).read_text(), f"{path} no longer reads {var}"
    compose_vars = {line.split("=", 1)[0] for line in (ROOT / ".env.example").read_text().splitlines() if "=" in line}
    for doc in sorted(DOCS.glob("*.md")):
        for var in sorted(set(re.findall(r"\bLORAPLEX_[A-Z0-9_]+\b", doc.read_text()))):
            assert var in known | set(OTHER_ENV) | compose_vars, f"{doc.name} mentions {var}, which nothing reads"


# ------------------------------------------------------------------------------------------- metrics
def test_metrics_table_lists_exactly_the_exported_metrics() -> None:
    exported = set(re.findall(r"^# TYPE (\S+) (\S+)$", generate_latest(EngineMetrics().registry).decode(), re.M))
    exported = {(name, kind) for name, kind in exported if not name.endswith("_created")}
    table = table_after(OPERATIONS.read_text(), "| metric | type | labels | meaning |\n|---|---|---|---|\n")
    documented = {(unquote(row[0]), row[1]) for row in table_rows("| h |\n|---|\n" + table)}
    assert documented == exported


# ------------------------------------------------------------------------------------------- error reasons
def code_reasons() -> set[str]:
    """Every ErrorInfo reason the code can produce: literal ``reason=`` values, class reasons, peer reasons."""
    found: set[str] = set()
    peers = {"registry"}
    for path in source_files():
        text = path.read_text()
        found |= set(re.findall(r'\breason\s*(?::\s*str\s*)?=\s*"([A-Z][A-Z0-9_]*)"', text))
        peers |= set(re.findall(r'\bpeer="([a-z]+)"', text))
    client = (ROOT / "registry" / "client.py").read_text()
    if 'reason=f"{peer.upper()}_UNAVAILABLE"' in client:
        found |= {f"{peer.upper()}_UNAVAILABLE" for peer in peers}
    return found


def documented_reasons() -> dict[str, str]:
    rows = table_rows(section(API.read_text(), "<!-- reasons:start -->", "<!-- reasons:end -->"))
    reasons: dict[str, str] = {}
    for row in rows:
        status, reason = unquote(row[0]), unquote(row[1])
        assert reason not in reasons, f"docs/api.md lists {reason} twice"
        reasons[reason] = status
    return reasons


def test_error_reasons_table_matches_the_code() -> None:
    documented, produced = set(documented_reasons()), code_reasons()
    assert not produced - documented, f"add to the reasons table in docs/api.md: {sorted(produced - documented)}"
    assert not documented - produced, f"docs/api.md lists reasons nothing raises: {sorted(documented - produced)}"


def test_error_classes_are_documented_under_their_status() -> None:
    documented = documented_reasons()
    pending: list[type[errors.LoraplexError]] = [errors.LoraplexError]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.__module__ != errors.__name__:
            continue  # subclasses elsewhere are covered by the source scan when their module defines a reason
        assert documented.get(cls.reason) == cls.code, f"{cls.__name__}: {cls.reason} should be under {cls.code}"


# ------------------------------------------------------------------------------------------- examples
def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.M | re.S)


def test_python_and_yaml_examples_parse() -> None:
    for doc in sorted(DOCS.glob("*.md")):
        text = doc.read_text()
        for block in code_blocks(text, "python"):
            compile(block, f"{doc.name} example", "exec")
        for block in code_blocks(text, "yaml"):
            assert isinstance(yaml.safe_load(block), dict), f"{doc.name}: YAML example is not a mapping"
    assert code_blocks(API.read_text(), "python"), "docs/api.md lost its Python examples"


def test_relative_links_and_paths_exist() -> None:
    for doc in sorted(DOCS.glob("*.md")):
        text = doc.read_text()
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"
        for path in re.findall(r"`((?:docker|protos|examples|registry|services|engine|kernels)/[\w./-]+)`", text):
            assert (ROOT / path).exists(), f"{doc.name} names missing path {path}"
