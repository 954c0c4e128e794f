"""The CLI as a user and a script meet it: real ``loraplex`` subprocesses against a registry subprocess.

``--json`` prints exactly one JSON document on stdout (numbers as numbers, progress on stderr, also from a
terminal), every API operation has a command, ``adapters pull`` resumes and refuses to clobber a folder, flags
are range-checked and take size units, and operational failures (port in use, closed pipe) are one line.
"""

from __future__ import annotations

import json
import os
import pty
import select
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.procs import LORAPLEX, ServerProcess, registry_args, run_cli, start_server

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture
def registry_proc(tmp_path: Path) -> Iterator[ServerProcess]:
    server = start_server(
        registry_args(f"sqlite:///{tmp_path / 'r.db'}", f"file://{tmp_path / 'blobs'}"),
        env={"LORAPLEX_SPOOL_DIR": str(tmp_path / "spool")},
    )
    yield server
    server.stop()


def cli(server: ServerProcess, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    result = run_cli([*args], env={"LORAPLEX_REGISTRY": server.address})
    if ok:
        assert result.returncode == 0, result.stderr + result.stdout
    return result


def one_json(result: subprocess.CompletedProcess[str]) -> Any:
    """stdout must be exactly one JSON document, starting at its first byte."""
    assert result.stdout.startswith(("{", "[")), f"stdout does not start with JSON: {result.stdout[:80]!r}"
    return json.loads(result.stdout)


def one_error_line(result: subprocess.CompletedProcess[str], status: str) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {status}"), result.stderr
    return lines[0]


def _push(server: ServerProcess, folder: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return cli(server, "adapters", "push", str(folder), "--name", "acme/bot", *extra)


def test_json_is_one_document_with_numbers_on_every_reporting_command(
    registry_proc: ServerProcess,
    tiny_models: dict[str, Path],
    tiny_adapters: dict[str, dict[str, Path]],
    tmp_path: Path,
) -> None:
    registered = one_json(
        cli(registry_proc, "models", "register", str(tiny_models["llama"]), "--name", "tiny-llama", "--json")
    )
    assert registered["num_hidden_layers"] == 2 and registered["vocab_size"] == 320
    assert one_json(cli(registry_proc, "models", "list", "--json"))[0]["hidden_size"] == 64
    pushed = one_json(
        _push(registry_proc, tiny_adapters["llama"]["qv-r4"], "--base-model", "tiny-llama", "--alias", "prod", "--json")
    )
    assert pushed["version"] == 1 and isinstance(pushed["size_bytes"], int) and pushed["aliases"] == ["prod"]
    second = one_json(_push(registry_proc, tiny_adapters["llama"]["all-r8"], "--json"))
    assert second["version"] == 2
    listed = one_json(cli(registry_proc, "adapters", "list", "--json"))
    assert listed[0]["latest_version"] == 2 and listed[0]["aliases"] == {"prod": 1}
    versions = one_json(cli(registry_proc, "adapters", "versions", "acme/bot", "--json"))
    assert [v["version"] for v in versions] == [2, 1] and versions[1]["aliases"] == ["prod"]
    assert one_json(cli(registry_proc, "adapters", "show", "acme/bot@prod", "--json"))["rank"] == 4
    aliased = one_json(cli(registry_proc, "adapters", "alias", "acme/bot@2", "stable", "--json"))
    assert aliased["aliases"] == {"prod": 1, "stable": 2}
    pulled = one_json(cli(registry_proc, "adapters", "pull", "acme/bot@1", str(tmp_path / "out"), "--json"))
    assert pulled["version"] == 1
    unaliased = one_json(cli(registry_proc, "adapters", "unalias", "acme/bot", "stable", "--json"))
    assert unaliased["aliases"] == {"prod": 1}
    deleted = one_json(cli(registry_proc, "adapters", "delete", "acme/bot@2", "--json"))
    assert deleted == {"deleted": {"adapter": "acme/bot", "version": 2, "digest": second["digest"]}}
    report = one_json(
        run_cli(
            [
                "registry",
                "gc",
                "--db",
                f"sqlite:///{tmp_path / 'r.db'}",
                "--blobs",
                f"file://{tmp_path / 'blobs'}",
                "--gc-grace-seconds",
                "0",
                "--json",
            ]
        )
    )
    assert report["deleted_bytes"] == second["size_bytes"] and report["removed_count"] == 1


def test_push_from_a_terminal_keeps_the_progress_bar_off_stdout(
    registry_proc: ServerProcess, tiny_models: dict[str, Path], tiny_adapters: dict[str, dict[str, Path]]
) -> None:
    """With stdout a terminal, the bar used to be drawn there (``| jq`` then failed on its first byte)."""
    cli(registry_proc, "models", "register", str(tiny_models["llama"]), "--name", "tiny-llama")
    main, child = pty.openpty()
    proc = subprocess.Popen(
        [
            LORAPLEX,
            "adapters",
            "push",
            str(tiny_adapters["llama"]["all-r64"]),
            "--name",
            "acme/tty",
            "--base-model",
            "tiny-llama",
            "--json",
        ],
        stdout=child,
        stderr=subprocess.PIPE,
        env={**os.environ, "LORAPLEX_REGISTRY": registry_proc.address, "TERM": "xterm", "COLUMNS": "100"},
    )
    os.close(child)
    chunks = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([main], [], [], 1)
        if ready:
            try:
                data = os.read(main, 65536)
            except OSError:  # the child closed its end
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.wait(timeout=60)
    os.close(main)
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    stdout = b"".join(chunks).decode().replace("\r\n", "\n")
    assert stdout.startswith("{") and json.loads(stdout)["version"] == 1, stdout[:200]


def test_versions_aliases_and_labels_have_commands(
    registry_proc: ServerProcess, tiny_models: dict[str, Path], tiny_adapters: dict[str, dict[str, Path]]
) -> None:
    cli(registry_proc, "models", "register", str(tiny_models["llama"]), "--name", "tiny-llama")
    _push(
        registry_proc,
        tiny_adapters["llama"]["qv-r4"],
        "--base-model",
        "tiny-llama",
        "--alias",
        "prod",
        "--label",
        "team=a",
    )
    _push(registry_proc, tiny_adapters["llama"]["all-r8"])
    table = cli(registry_proc, "adapters", "versions", "acme/bot").stdout.splitlines()
    assert [line.split("\t")[0] for line in table] == ["acme/bot@2", "acme/bot@1"] and "aliases=prod" in table[1]
    updated = one_json(
        cli(
            registry_proc,
            "adapters",
            "update",
            "acme/bot",
            "--description",
            "support bot",
            "--label",
            "env=prod",
            "--json",
        )
    )
    assert updated["description"] == "support bot" and updated["labels"] == {"team": "a", "env": "prod"}
    updated = one_json(cli(registry_proc, "adapters", "update", "acme/bot", "--remove-label", "team", "--json"))
    assert updated["labels"] == {"env": "prod"} and updated["description"] == "support bot"
    nothing = cli(registry_proc, "adapters", "update", "acme/bot", ok=False)
    assert "--description, --label or --remove-label" in one_error_line(nothing, "INVALID_ARGUMENT")
    cli(registry_proc, "adapters", "unalias", "acme/bot", "prod")
    assert one_json(cli(registry_proc, "adapters", "show", "acme/bot", "--json"))["aliases"] == []
    gone = cli(registry_proc, "adapters", "unalias", "acme/bot", "prod", ok=False)
    one_error_line(gone, "NOT_FOUND (ALIAS_NOT_FOUND)")
    refused = cli(registry_proc, "adapters", "delete", "acme/bot", ok=False)
    line = one_error_line(refused, "FAILED_PRECONDITION (ADAPTER_HAS_VERSIONS)")
    assert "--force" in line and "force=True" not in line


def test_pull_refuses_a_full_folder_and_resumes_a_partial_one(
    registry_proc: ServerProcess,
    tiny_models: dict[str, Path],
    tiny_adapters: dict[str, dict[str, Path]],
    tmp_path: Path,
) -> None:
    cli(registry_proc, "models", "register", str(tiny_models["llama"]), "--name", "tiny-llama")
    source = tiny_adapters["llama"]["all-r64"]
    _push(registry_proc, source, "--base-model", "tiny-llama")
    weights = (source / WEIGHTS).read_bytes()
    version = one_json(cli(registry_proc, "adapters", "show", "acme/bot", "--json"))

    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    refused = cli(registry_proc, "adapters", "pull", "acme/bot", str(full), ok=False)
    assert "--force" in one_error_line(refused, "FAILED_PRECONDITION (FOLDER_NOT_EMPTY)")
    assert sorted(p.name for p in full.iterdir()) == ["notes.txt"]
    cli(registry_proc, "adapters", "pull", "acme/bot", str(full), "--force")
    assert (full / WEIGHTS).read_bytes() == weights and (full / "notes.txt").read_text() == "mine"

    # An interrupted pull left the first part: the next pull continues from there (and checks the whole file).
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    partial = resumed / f".{WEIGHTS}.{version['weights_sha256'][:16]}.partial"
    partial.write_bytes(weights[: len(weights) // 3])
    cli(registry_proc, "adapters", "pull", "acme/bot", str(resumed))
    assert (resumed / WEIGHTS).read_bytes() == weights and not partial.exists()
    assert json.loads((resumed / "adapter_config.json").read_text()) == json.loads(version["adapter_config_json"])

    # A partial file with wrong bytes is not trusted: the sha256 check fails, the file goes, a retry succeeds.
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    partial = damaged / partial.name
    partial.write_bytes(b"\0" * 1000)
    failed = cli(registry_proc, "adapters", "pull", "acme/bot", str(damaged), ok=False)
    one_error_line(failed, "UNAVAILABLE (DOWNLOAD_CORRUPT)")
    assert not partial.exists() and not (damaged / WEIGHTS).exists()
    cli(registry_proc, "adapters", "pull", "acme/bot", str(damaged))
    assert (damaged / WEIGHTS).read_bytes() == weights


def test_numeric_flags_are_range_checked_and_sizes_take_units(tmp_path: Path) -> None:
    base = ["--db", f"sqlite:///{tmp_path / 'r.db'}", "--blobs", f"file://{tmp_path / 'blobs'}"]
    line = one_error_line(run_cli(["registry", "serve", *base, "--max-rank", "-5"]), "INVALID_ARGUMENT")
    assert "--max-rank: must be at least 1, got -5" in line
    line = one_error_line(
        run_cli(["registry", "serve", *base], env={"LORAPLEX_GC_GRACE_SECONDS": "-1"}), "INVALID_ARGUMENT"
    )
    assert "LORAPLEX_GC_GRACE_SECONDS: must be at least 0" in line
    line = one_error_line(run_cli(["registry", "serve", *base, "--max-adapter-bytes", "4 parsecs"]), "INVALID_ARGUMENT")
    assert "--max-adapter-bytes" in line and "4GiB" in line
    ok = run_cli(["registry", "gc", *base, "--max-adapter-bytes", "4GiB", "--json"])
    assert ok.returncode == 0 and one_json(ok)["removed_count"] == 0
    line = one_error_line(run_cli(["generate", "--max-new-tokens", "0", "hi"]), "INVALID_ARGUMENT")
    assert "--max-new-tokens" in line


def test_settings_sizes_parse_units() -> None:
    from loraplex.services.settings import EngineSettings, from_sources, parse_size

    assert parse_size("4GiB") == 4 * 1024**3 and parse_size("512 MiB") == 512 * 1024**2
    assert parse_size("1.5GB") == 1_500_000_000 and parse_size("4096") == 4096 and parse_size("2kib") == 2048
    for bad in ("", "GiB", "-1GiB", "1.5B", "4 parsecs", "1e9"):
        with pytest.raises(ValueError):
            parse_size(bad)
    env = {"LORAPLEX_HOST_ADAPTER_BYTES": "3GiB", "LORAPLEX_KV_CACHE_BYTES": "64MiB", "LORAPLEX_METRICS_PORT": "0"}
    settings = from_sources(EngineSettings, env=env)
    assert settings.host_adapter_bytes == 3 * 1024**3 and settings.kv_cache_bytes == 64 * 1024**2
    assert settings.metrics_port == 0


def _held_port() -> tuple[socket.socket, int]:
    held = socket.create_server(("127.0.0.1", 0))
    port: int = held.getsockname()[1]
    return held, port


def test_a_port_in_use_is_one_bind_failed_line(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    held, port = _held_port()
    with held:
        registry = run_cli(
            [
                "registry",
                "serve",
                "--listen",
                f"127.0.0.1:{port}",
                "--db",
                f"sqlite:///{tmp_path / 'r.db'}",
                "--blobs",
                f"file://{tmp_path / 'blobs'}",
            ]
        )
        assert "in use" in one_error_line(registry, "FAILED_PRECONDITION (BIND_FAILED)")
        engine = run_cli(
            [
                "engine",
                "serve",
                "--model",
                str(tiny_models["llama"]),
                "--listen",
                f"127.0.0.1:{port}",
                "--http-listen",
                "",
            ],
            timeout=300,
        )
        one_error_line(engine, "FAILED_PRECONDITION (BIND_FAILED)")


def test_a_bad_model_is_one_line_without_an_event_loop_traceback(tmp_path: Path) -> None:
    result = run_cli(
        ["engine", "serve", "--model", str(tmp_path / "missing"), "--listen", "127.0.0.1:0", "--http-listen", ""],
        timeout=300,
    )
    assert "missing" in one_error_line(result, "FAILED_PRECONDITION")


def test_a_closed_pipe_ends_a_listing_quietly(
    registry_proc: ServerProcess, tiny_models: dict[str, Path], tiny_adapters: dict[str, dict[str, Path]]
) -> None:
    """``loraplex adapters list | head -0``: the reader is gone before the first byte is written."""
    cli(registry_proc, "models", "register", str(tiny_models["llama"]), "--name", "tiny-llama")
    _push(registry_proc, tiny_adapters["llama"]["qv-r4"], "--base-model", "tiny-llama")
    for command in (["adapters", "list"], ["adapters", "list", "--json"], ["models", "list"]):
        proc = subprocess.Popen(
            [LORAPLEX, *command],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "LORAPLEX_REGISTRY": registry_proc.address},
        )
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # like `head -0`: nobody will ever read
        stderr = proc.stderr.read().decode()
        proc.wait(timeout=60)
        assert stderr == "", stderr
        assert proc.returncode == 1


def test_an_unreachable_database_at_start_is_one_line(tmp_path: Path) -> None:
    held, port = _held_port()
    held.close()  # a port nothing listens on
    db = f"postgresql+psycopg://loraplex@127.0.0.1:{port}/registry"
    for command in (["registry", "gc"], ["registry", "migrate"], ["registry", "serve", "--listen", "127.0.0.1:0"]):
        result = run_cli([*command, "--db", db, "--blobs", f"file://{tmp_path / 'blobs'}"])
        line = one_error_line(result, "UNAVAILABLE")
        assert "metadata database unavailable" in line and str(port) in line  # the operator's own detail
