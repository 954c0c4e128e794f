"""Tier 3: adapters on local disk by version digest, so a restart or a host-tier eviction need not re-download.

Why keyed by digest and written atomically (temp file + rename): a digest names exactly one (config, weights)
pair forever, so a file that exists is complete and current; an interrupted write leaves only a temp file that
the next start removes. LRU by modification time within a byte budget; a hit refreshes the time.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from loraplex.registry.refs import DIGEST_RE

_SUFFIX = ".adapter"


class DiskTier:
    def __init__(self, root: Path, budget_bytes: int):
        self.root = root
        self.budget = budget_bytes
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("*.tmp"):
            stale.unlink(missing_ok=True)

    def _path(self, digest: str) -> Path:
        if not DIGEST_RE.match(digest):
            raise ValueError(f"not a version digest: {digest!r}")
        return self.root / (digest.replace(":", "-") + _SUFFIX)

    def get(self, digest: str) -> tuple[str, bytes] | None:
        """(adapter_config.json text, weights) or None; the caller verifies the digest before trusting it."""
        path = self._path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        os.utime(path)
        header_len = int.from_bytes(data[:8], "little")
        config = json.loads(data[8 : 8 + header_len])["adapter_config_json"]
        return str(config), data[8 + header_len :]

    def put(self, digest: str, config_json: str, weights: bytes) -> None:
        header = json.dumps({"adapter_config_json": config_json}).encode()
        size = 8 + len(header) + len(weights)
        if size > self.budget:
            return  # larger than the whole tier: not worth evicting everything for
        self._make_room(size)
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
        with os.fdopen(fd, "wb") as out:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            out.write(weights)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self._path(digest))

    def remove(self, digest: str) -> None:
        self._path(digest).unlink(missing_ok=True)

    def _make_room(self, needed: int) -> None:
        entries = sorted(
            ((p.stat().st_mtime, p.stat().st_size, p) for p in self.root.glob("*" + _SUFFIX)), key=lambda e: e[0]
        )
        used = sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if used + needed <= self.budget:
                break
            path.unlink(missing_ok=True)
            used -= size

    def used_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.glob("*" + _SUFFIX))
