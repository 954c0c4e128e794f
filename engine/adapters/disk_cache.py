"""Tier 3: adapters on local disk by version digest, so a restart or a host-tier eviction need not re-download.

Why keyed by digest and written atomically (temp file + rename): a digest names exactly one (config, weights)
pair forever, so a file that exists is complete and current; an interrupted write leaves only a temp file that
the next start removes. LRU by modification time within a byte budget; a hit refreshes the time.

Why every failure is a miss: the tier is only a cache. A disk can still hand back a damaged file (bit rot, a
truncating copy, a full disk, an operator's edit); such an entry must cost one re-download, never make its digest
unservable. ``get`` therefore checks the length prefix, the JSON header and the version digest itself, and on
any problem removes the file and answers None; ``put`` failing (disk full, folder gone) only skips caching.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

from loraplex.registry.digest import version_digest
from loraplex.registry.errors import InvalidAdapter
from loraplex.registry.refs import DIGEST_RE

log = logging.getLogger("loraplex.engine.disk_cache")

_SUFFIX = ".adapter"
_PREFIX_BYTES = 8


class DamagedEntry(Exception):
    """A disk entry that cannot be read back as the (config, weights) its digest names."""


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
        """(adapter_config.json text, weights), verified against ``digest``; None on a miss.

        A missing file is a miss; so is one that cannot be read or does not verify, which is removed first.
        """
        path = self._path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._discard(path, f"unreadable: {exc}")
            return None
        try:
            config, weights = _decode(data, digest)
        except DamagedEntry as exc:
            self._discard(path, str(exc))
            return None
        with contextlib.suppress(OSError):  # only the LRU order suffers
            os.utime(path)
        return config, weights

    def _discard(self, path: Path, why: str) -> None:
        log.warning("disk cache entry %s is damaged (%s): removed, will re-download", path.name, why)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not remove damaged disk cache entry %s: %s", path.name, exc)

    def put(self, digest: str, config_json: str, weights: bytes) -> None:
        """Best effort: a write that fails (disk full, folder removed) leaves no file and raises nothing."""
        path = self._path(digest)
        header = json.dumps({"adapter_config_json": config_json}).encode()
        size = _PREFIX_BYTES + len(header) + len(weights)
        if size > self.budget:
            return  # larger than the whole tier: not worth evicting everything for
        tmp: str | None = None
        try:
            self._make_room(size)
            fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
            with os.fdopen(fd, "wb") as out:
                out.write(len(header).to_bytes(_PREFIX_BYTES, "little"))
                out.write(header)
                out.write(weights)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("could not write disk cache entry %s: %s", path.name, exc)
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)

    def remove(self, digest: str) -> None:
        self._path(digest).unlink(missing_ok=True)

    def _entries(self) -> list[tuple[float, int, Path]]:
        """(mtime, size, path) of every entry; one removed meanwhile by another process is skipped."""
        found = []
        for path in self.root.glob("*" + _SUFFIX):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            found.append((stat.st_mtime, stat.st_size, path))
        return found

    def _make_room(self, needed: int) -> None:
        entries = sorted(self._entries(), key=lambda e: e[0])
        used = sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if used + needed <= self.budget:
                break
            path.unlink(missing_ok=True)
            used -= size

    def used_bytes(self) -> int:
        return sum(size for _, size, _ in self._entries())


def _decode(data: bytes, digest: str) -> tuple[str, bytes]:
    """Split an entry into (config, weights) and check it is the content ``digest`` names."""
    if len(data) < _PREFIX_BYTES:
        raise DamagedEntry(f"{len(data)} bytes is shorter than the length prefix")
    header_len = int.from_bytes(data[:_PREFIX_BYTES], "little")
    if header_len > len(data) - _PREFIX_BYTES:
        raise DamagedEntry(f"header length {header_len} runs past the end of the {len(data)}-byte file")
    try:
        header = json.loads(data[_PREFIX_BYTES : _PREFIX_BYTES + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise DamagedEntry(f"header is not JSON: {exc}") from None
    config = header.get("adapter_config_json") if isinstance(header, dict) else None
    if not isinstance(config, str):
        raise DamagedEntry("header has no adapter_config_json string")
    weights = data[_PREFIX_BYTES + header_len :]
    try:
        actual = version_digest(config, hashlib.sha256(weights).hexdigest())
    except InvalidAdapter as exc:  # the stored config text is not JSON
        raise DamagedEntry(str(exc)) from None
    if actual != digest:
        raise DamagedEntry(f"content hashes to {actual}")
    return config, weights
