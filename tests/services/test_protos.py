"""The protos are the contract: lint-clean and documented, no breaking change, generation config that works offline,
and checked-in stubs that match them exactly."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import pytest
import yaml

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


def _buf() -> str:
    buf = shutil.which("buf", path=str(Path(sys.executable).parent)) or shutil.which("buf")
    if buf is None:
        pytest.skip("buf not installed (pip install buf-bin)")
    return buf


def _copy_workspace(tmp_path: Path) -> Path:
    """protos/ and buf.yaml in a scratch folder, to break on purpose."""
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    return tmp_path


def test_buf_lint_standard_and_comments_is_clean() -> None:
    result = subprocess.run([_buf(), "lint"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint_catches_a_violation(tmp_path: Path) -> None:
    work = _copy_workspace(tmp_path)
    bad = work / "protos" / "loraplex" / "registry" / "v1" / "bad.proto"
    bad.write_text('syntax = "proto3";\npackage loraplex.registry.v1;\n// Colors.\nenum Color { RED = 0; }\n')
    result = subprocess.run([_buf(), "lint"], cwd=work, capture_output=True, text=True)
    assert result.returncode != 0 and "UNSPECIFIED" in (result.stdout + result.stderr)


def test_buf_lint_requires_every_field_documented(tmp_path: Path) -> None:
    """COMMENTS is on: an undocumented field (the old protos had 184 such gaps) fails lint."""
    work = _copy_workspace(tmp_path)
    proto = work / "protos" / "loraplex" / "engine" / "v1" / "engine_service.proto"
    text = proto.read_text()
    documented = "  // Token counts.\n  Usage usage = 4;\n"
    assert documented in text
    proto.write_text(text.replace(documented, "  Usage usage = 4;\n", 1))
    result = subprocess.run([_buf(), "lint"], cwd=work, capture_output=True, text=True)
    assert result.returncode != 0
    assert 'Field "usage" should have a non-empty comment' in result.stdout + result.stderr


def test_buf_lint_leaves_the_vendored_google_rpc_files_alone(tmp_path: Path) -> None:
    """Google's files follow Google's style (e.g. no _UNSPECIFIED zero values); linting them would fail."""
    work = _copy_workspace(tmp_path)
    (work / "buf.yaml").write_text((work / "buf.yaml").read_text().replace("    - protos/google\n", ""))
    result = subprocess.run([_buf(), "lint"], cwd=work, capture_output=True, text=True)
    assert result.returncode != 0 and "protos/google/rpc/" in result.stdout + result.stderr


def test_no_breaking_change_against_the_released_baseline() -> None:
    """The meaningful check in CI: it tests a clone of main, so main-vs-main passes trivially; the checked-in
    baseline (tools/protos_baseline.json, refreshed only on release) still catches any break since then."""
    result = subprocess.run(
        [_buf(), "breaking", "--against", str(gen_protos().BASELINE)], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_breaking_change_against_main() -> None:
    """On a branch: nothing main promises is broken. On main itself (CI) this compares main with main.

    A branch that lags behind main fails here when main gained fields since: merge main first (its additions
    are not breaking once merged)."""
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    has_main = subprocess.run(["git", "rev-parse", "-q", "--verify", "main"], cwd=ROOT, capture_output=True)
    if has_main.returncode != 0:
        pytest.skip("no local branch 'main' (not a git clone of loraplex)")
    result = subprocess.run(
        [_buf(), "breaking", "--against", ".git#branch=main"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("int32 hidden_size = 4;", "int64 hidden_size = 4;", 'changed type from "int32" to "int64"'),
        ("string digest = 3;\n  // Hex sha256", "string content_digest = 3;\n  // Hex sha256", "changed name"),
        ("  VERSION_STATE_FAILED = 3;\n", "", 'enum value "3" on enum "VersionState" was deleted'),
    ],
    ids=["field-type", "field-name", "enum-value"],
)
def test_breaking_check_catches_a_break(tmp_path: Path, old: str, new: str, message: str) -> None:
    work = _copy_workspace(tmp_path)
    proto = work / "protos" / "loraplex" / "registry" / "v1" / "registry_service.proto"
    text = proto.read_text()
    assert text.count(old) == 1, old
    proto.write_text(text.replace(old, new))
    result = subprocess.run(
        [_buf(), "breaking", "--against", str(gen_protos().BASELINE)], cwd=work, capture_output=True, text=True
    )
    assert result.returncode != 0 and message in result.stdout + result.stderr, result.stdout + result.stderr


def test_vendored_google_rpc_matches_the_python_types() -> None:
    """The vendored files keep Google's license header and describe the same messages, field for field, as the
    googleapis-common-protos the Python side decodes errors with."""
    from google.protobuf import descriptor_pb2
    from google.rpc import error_details_pb2, status_pb2

    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "image.binpb"
        subprocess.run(
            [_buf(), "build", "--exclude-source-info", "--path", "protos/google", "-o", str(image)],
            cwd=ROOT,
            check=True,
        )
        files = descriptor_pb2.FileDescriptorSet.FromString(image.read_bytes()).file
    vendored = {f.name: f for f in files if f.name.startswith("google/rpc/")}
    assert set(vendored) >= {"google/rpc/status.proto", "google/rpc/error_details.proto"}
    for name in vendored:
        header = (ROOT / "protos" / name).read_text()[:800]
        assert "Copyright" in header and "Google LLC" in header and "Apache License, Version 2.0" in header, name
    for module in (status_pb2, error_details_pb2):
        python = module.DESCRIPTOR
        ours = vendored[python.name]
        for message in ours.message_type:
            theirs = python.message_types_by_name[message.name]
            assert {(f.name, f.number, f.type) for f in message.field} == {
                (f.name, f.number, f.type) for f in theirs.fields
            }, message.name


def test_python_stubs_are_generated_only_for_loraplex(tmp_path: Path) -> None:
    gen_protos().generate(tmp_path)
    assert (tmp_path / "loraplex").is_dir()
    assert not (tmp_path / "google").exists(), "google/rpc comes from googleapis-common-protos, not from us"


# Plugins buf.gen.yaml names, and where each may be found here (Debian packages, the examples' npm packages).
PLUGIN_BINARIES = {
    "protoc-gen-go": ["protoc-gen-go"],
    "protoc-gen-go-grpc": ["protoc-gen-go-grpc"],
    "protoc-gen-es": [str(ROOT / "examples" / "node" / "node_modules" / ".bin" / "protoc-gen-es")],
    "protoc-gen-grpc-java": ["protoc-gen-grpc-java", "grpc_java_plugin"],
}


def _plugin_dir(tmp_path: Path) -> tuple[Path, set[str]]:
    """A folder of links to the plugins this machine has, under the names buf.gen.yaml uses."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    found = set()
    for name, candidates in PLUGIN_BINARIES.items():
        path = next((shutil.which(c) for c in candidates if shutil.which(c)), None)
        if path:
            (bin_dir / name).symlink_to(path)
            found.add(name)
    if shutil.which("protoc"):  # buf runs protoc itself for protoc_builtin plugins (java)
        found.add("java")
    return bin_dir, found


def test_buf_generate_with_the_generation_config(tmp_path: Path) -> None:
    """buf.gen.yaml works offline with every plugin this machine has (tools/setup.sh --test installs them all);
    the plugins it lacks are dropped from a copy of the file. Checks what managed mode promises: Go code in the
    user's module, Java under dev.loraplex, google/rpc generated for TypeScript only."""
    buf = _buf()
    result = subprocess.run([buf, "build"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load((ROOT / "buf.gen.yaml").read_text())
    bin_dir, found = _plugin_dir(tmp_path)
    config["plugins"] = [p for p in config["plugins"] if (p.get("local") or p.get("protoc_builtin")) in found]
    if not config["plugins"]:
        pytest.skip("no code generation plugin installed (tools/setup.sh --test installs them)")
    template = tmp_path / "buf.gen.yaml"
    template.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(
        [buf, "generate", "--template", str(template), "-o", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    prefix = next(o["value"] for o in config["managed"]["override"] if o["file_option"] == "go_package_prefix")
    if "protoc-gen-go" in found:
        go = (out / "gen/go/loraplex/engine/v1/engine_service.pb.go").read_text()
        assert "package enginev1" in go
        assert not (out / "gen/go/google").exists()
        assert prefix.startswith("example.com/")  # a placeholder the user replaces with their module path
    if "protoc-gen-go-grpc" in found:
        assert "EngineServiceClient" in (out / "gen/go/loraplex/engine/v1/engine_service_grpc.pb.go").read_text()
    if "protoc-gen-es" in found:
        assert (out / "gen/es/loraplex/engine/v1/engine_service_pb.ts").is_file()
        assert "ErrorInfo" in (out / "gen/es/google/rpc/error_details_pb.ts").read_text()
    if "java" in found:
        assert (out / "gen/java/dev/loraplex/engine/v1/GenerateStreamRequest.java").is_file()
        assert not (out / "gen/java/com/google/rpc").exists()
    if "protoc-gen-grpc-java" in found:
        assert (out / "gen/java/dev/loraplex/registry/v1/AdapterRegistryServiceGrpc.java").is_file()


def gen_protos() -> types.ModuleType:
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import gen_protos as module
    finally:
        sys.path.pop(0)
    return module


def test_stubs_import_under_the_loraplex_namespace() -> None:
    from loraplex.engine.v1 import engine_service_pb2
    from loraplex.registry.v1 import registry_service_pb2

    assert registry_service_pb2.DESCRIPTOR.package == "loraplex.registry.v1"
    assert engine_service_pb2.DESCRIPTOR.package == "loraplex.engine.v1"
