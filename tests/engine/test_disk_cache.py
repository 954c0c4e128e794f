"""The disk tier: any entry that cannot be read back as what its digest names is a miss, removed, never an error.

Why: the fetcher serves a digest from disk when it can; a damaged file that raised from ``get`` made that digest
UNAVAILABLE on every request (even with the registry up, which could have re-sent it). Real files on disk, real
damage: a cut length prefix, a mangled JSON header, a truncated file, a flipped byte, a folder in the way.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from loraplex.engine.adapters.disk_cache import DiskTier
from loraplex.registry.digest import version_digest

CONFIG = json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]})
WEIGHTS = bytes(range(256)) * 64


def _digest(config: str = CONFIG, weights: bytes = WEIGHTS) -> str:
    return version_digest(config, hashlib.sha256(weights).hexdigest())


def _entry(tier: DiskTier, digest: str) -> Path:
    (path,) = tier.root.glob(digest.replace(":", "-") + "*")
    return path


def test_round_trip_and_lru_budget(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path / "disk", budget_bytes=3 * len(WEIGHTS))
    digest = _digest()
    assert tier.get(digest) is None
    tier.put(digest, CONFIG, WEIGHTS)
    assert tier.get(digest) == (CONFIG, WEIGHTS)
    others = [bytes([i]) * len(WEIGHTS) for i in range(3)]
    for weights in others:
        tier.put(_digest(weights=weights), CONFIG, weights)
    assert tier.used_bytes() <= 3 * len(WEIGHTS)
    assert tier.get(digest) is None  # the oldest went first
    assert tier.get(_digest(weights=others[-1])) == (CONFIG, others[-1])


def _rewrite(edit: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(edit(path.read_bytes()))


def _header_text(text: bytes) -> Callable[[bytes], bytes]:
    return lambda data: len(text).to_bytes(8, "little") + text + data[8 + int.from_bytes(data[:8], "little") :]


def _folder_in_the_way(path: Path) -> None:
    path.unlink()
    path.mkdir()


DAMAGE: dict[str, Callable[[Path], None]] = {
    "empty-file": _rewrite(lambda d: b""),
    "shorter-than-prefix": _rewrite(lambda d: d[:5]),
    "length-prefix-huge": _rewrite(lambda d: (2**63).to_bytes(8, "little") + d[8:]),
    "length-prefix-past-eof": _rewrite(lambda d: (len(d)).to_bytes(8, "little") + d[8:]),
    "json-header-damaged": _rewrite(lambda d: d[:8] + b"#" + d[9:]),
    "json-header-not-utf8": _rewrite(lambda d: d[:8] + b"\xff" + d[9:]),
    "json-header-not-an-object": _rewrite(_header_text(b"[1, 2]")),
    "json-header-without-config": _rewrite(_header_text(b'{"other": 1}')),
    "config-not-json": _rewrite(_header_text(json.dumps({"adapter_config_json": "{nope"}).encode())),
    "truncated-weights": _rewrite(lambda d: d[:-100]),
    "flipped-weight-byte": _rewrite(lambda d: d[:-1] + bytes([d[-1] ^ 1])),
    "other-config": _rewrite(_header_text(json.dumps({"adapter_config_json": CONFIG.replace("8", "16")}).encode())),
    "folder-in-the-way": _folder_in_the_way,
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_entry_is_a_miss_and_is_removed(damage: str, tmp_path: Path) -> None:
    tier = DiskTier(tmp_path / "disk", budget_bytes=1 << 30)
    digest = _digest()
    tier.put(digest, CONFIG, WEIGHTS)
    path = _entry(tier, digest)
    DAMAGE[damage](path)
    assert tier.get(digest) is None
    if damage == "folder-in-the-way":
        shutil.rmtree(path)  # a folder is not ours to delete; the miss is what matters
    assert not path.exists()
    # The re-downloaded copy goes back in and serves again.
    tier.put(digest, CONFIG, WEIGHTS)
    assert tier.get(digest) == (CONFIG, WEIGHTS)


def test_a_failed_write_skips_caching_without_raising(tmp_path: Path) -> None:
    root = tmp_path / "disk"
    tier = DiskTier(root, budget_bytes=1 << 30)
    shutil.rmtree(root)  # the folder vanished (unmounted, cleaned up) while the engine runs
    tier.put(_digest(), CONFIG, WEIGHTS)
    assert tier.get(_digest()) is None
    assert not root.exists() or not any(root.iterdir())
