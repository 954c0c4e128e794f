"""The protos are the contract: lint-clean, and the checked-in stubs match them exactly."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_are_current() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_protos.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, f"stubs are stale; run `make protos`:\n{result.stderr}"


def test_stale_check_detects_an_edited_stub(tmp_path: Path) -> None:
    """The staleness check must fail when a stub differs, or the test above proves nothing."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import gen_protos
    finally:
        sys.path.pop(0)
    generated = tmp_path / "gen"
    generated.mkdir()
    gen_protos.generate(generated)
    assert gen_protos.stale_files(generated) == []
    stub = generated / "loraplex" / "registry" / "v1" / "registry_service_pb2.py"
    stub.write_text(stub.read_text() + "\n# edited\n")
    assert any("stale" in p and p.endswith("registry_service_pb2.py") for p in gen_protos.stale_files(generated))


def test_buf_lint_standard_is_clean() -> None:
    buf = shutil.which("buf", path=str(Path(sys.executable).parent)) or shutil.which("buf")
    if buf is None:
        pytest.skip("buf not installed (pip install buf-bin)")
    result = subprocess.run([buf, "lint"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint_catches_a_violation(tmp_path: Path) -> None:
    buf = shutil.which("buf", path=str(Path(sys.executable).parent)) or shutil.which("buf")
    if buf is None:
        pytest.skip("buf not installed (pip install buf-bin)")
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    bad = tmp_path / "protos" / "loraplex" / "registry" / "v1" / "bad.proto"
    bad.write_text('syntax = "proto3";\npackage loraplex.registry.v1;\nenum Color { RED = 0; }\n')
    result = subprocess.run([buf, "lint"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode != 0 and "UNSPECIFIED" in (result.stdout + result.stderr)


def test_stubs_import_under_the_loraplex_namespace() -> None:
    from loraplex.engine.v1 import engine_service_pb2
    from loraplex.registry.v1 import registry_service_pb2

    assert registry_service_pb2.DESCRIPTOR.package == "loraplex.registry.v1"
    assert engine_service_pb2.DESCRIPTOR.package == "loraplex.engine.v1"
