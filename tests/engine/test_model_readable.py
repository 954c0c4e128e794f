"""The engine refuses, in one clear line, a model folder its user cannot read (compose: uid 10001 over a host folder
of 0600 safetensors files), before parsing anything."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from loraplex.engine.model.build import load_model
from loraplex.engine.model.errors import ModelLoadError
from loraplex.engine.model.readable import check_model_folder_readable

NOBODY = 65534


def _fails_as_another_user(call: Callable[[], object]) -> str:
    """Run ``call`` as a user that owns nothing here; return its ModelLoadError message ("" if it passed).

    As root the check cannot fail (root reads everything), so a forked child drops to uid/gid 65534 first; it
    calls in-process because the interpreter itself may not be executable by that user.
    """
    if os.geteuid() != 0:
        try:
            call()
        except ModelLoadError as exc:
            return str(exc.message)
        return ""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        message = "unexpected"
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            call()
            message = ""
        except ModelLoadError as exc:
            message = str(exc.message)
        except BaseException as exc:  # reported to the parent, which fails the test
            message = f"unexpected {type(exc).__name__}: {exc}"
        finally:
            os.write(write_end, message.encode())
            os._exit(0)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()


@pytest.fixture
def shared_model(tiny_models: dict[str, Path]) -> Iterator[Path]:
    """A copy of the tiny Llama in a folder any user can reach (pytest's tmp_path is 0700), files 0644."""
    root = Path(tempfile.mkdtemp(prefix="loraplex-readable-"))
    root.chmod(0o755)
    model_dir = root / "model"
    shutil.copytree(tiny_models["llama"], model_dir)
    model_dir.chmod(0o755)
    for path in model_dir.iterdir():
        path.chmod(0o644)
    yield model_dir
    shutil.rmtree(root)


def test_a_readable_folder_passes(shared_model: Path) -> None:
    assert _fails_as_another_user(lambda: check_model_folder_readable(shared_model)) == ""


def test_a_0600_weights_file_is_named_with_its_mode_and_the_fix(shared_model: Path) -> None:
    weights = shared_model / "model.safetensors"
    weights.chmod(0o600)  # what safetensors writes
    message = _fails_as_another_user(lambda: check_model_folder_readable(shared_model))
    assert "cannot read model.safetensors (mode 0600, owner uid" in message, message
    assert f"chmod -R a+rX {shared_model}" in message
    assert "config.json" not in message  # only the unreadable files are named


def test_an_unlistable_folder_is_refused(shared_model: Path) -> None:
    shared_model.chmod(0o700)
    message = _fails_as_another_user(lambda: check_model_folder_readable(shared_model))
    assert "cannot be listed" in message and "chmod a+rx" in message, message


def test_load_model_checks_readability_first(shared_model: Path) -> None:
    """Without the check, the loader fails later with a bare PermissionError for one file."""
    (shared_model / "tokenizer.json").chmod(0o600)
    (shared_model / "model.safetensors").chmod(0o600)
    message = _fails_as_another_user(lambda: load_model(shared_model, "float32", torch.device("cpu"), None))
    assert "cannot read model.safetensors (mode 0600" in message and "tokenizer.json (mode 0600" in message, message


def test_missing_and_empty_folders_say_what_to_set(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"does not exist .*LORAPLEX_MODEL_DIR"):
        check_model_folder_readable(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"is empty, config\.json not found .*LORAPLEX_MODEL_DIR"):
        load_model(tmp_path / "empty", "float32", torch.device("cpu"), None)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelLoadError, match="is not a folder"):
        check_model_folder_readable(tmp_path / "file")
