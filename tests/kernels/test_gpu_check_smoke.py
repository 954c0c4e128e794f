"""``bench/gpu_check.sh --smoke`` runs end to end on CPU, so the one-shot GPU check cannot rot between lent GPUs.

Why a test: the script only ever runs for real on a borrowed H100/H200 with minutes of device time; a broken
import or flag there wastes the loan. The smoke mode runs the same three sections at tiny shapes (Triton's
interpreter, the torch backend) and must produce every table.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_smoke_writes_every_table(tmp_path: Path) -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "OUT": str(tmp_path)}
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--smoke"],
        env=env,
        capture_output=True,
        text=True,
        timeout=480,
        check=False,
    )
    summary = (tmp_path / "gpu_check.md").read_text()
    assert done.returncode == 0, summary + done.stderr[-2000:]
    assert summary.count(": ok (") == 3, summary
    for heading in ("### LoRA kernels", "Paged decode attention", "### Engine decode"):
        assert heading in summary
    assert len(list(tmp_path.iterdir())) <= 8  # what the device tool brings back
