"""The demo's build is readable by every user, so compose's engine (uid 10001) can read the model it trained."""

from __future__ import annotations

import io
import stat
from pathlib import Path

from rich.console import Console

from loraplex.services.demo_train import Recipe, Task, build_demo


def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}


def test_demo_build_is_world_readable_also_when_reused(tmp_path: Path) -> None:
    # A few training steps: the files and their modes are what matter here, not the accuracy.
    recipe = Recipe(
        base=Task("copy", "copies the word", 2),
        adapters=(Task("upper", "uppercases it", 2, rank=4),),
        held_out=2,
        validation_words=4,
        attempts=1,
        validation_target=0.0,
    )
    assets = build_demo(tmp_path / "demo", recipe, console=Console(file=io.StringIO()))
    weights = assets.model_dir / "model.safetensors"
    assert weights.is_file() and any(assets.adapters["upper"].glob("*.safetensors"))
    for name, mode in _modes(assets.folder).items():
        assert mode & 0o444 == 0o444, f"{name} is {mode:04o}: not readable by the engine's user"
        if (assets.folder / name).is_dir():
            assert mode & 0o111 == 0o111, f"{name} is {mode:04o}: not traversable"
    weights.chmod(0o600)  # a build made before this fix
    reused = build_demo(tmp_path / "demo", recipe, console=Console(file=io.StringIO()))
    assert not reused.trained
    assert stat.S_IMODE(weights.stat().st_mode) == 0o644
