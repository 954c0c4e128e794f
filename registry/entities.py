"""Frozen domain entities: what leaves the store and what the servicer converts to protos.

Why frozen dataclasses and not ORM rows: rows are bound to a session and mutable; entities are plain values that
can cross threads (``asyncio.to_thread``) and be cached without surprises.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Generic, TypeVar

from loraplex.registry.spec import ModelSpec

T = TypeVar("T")


@dataclass(frozen=True)
class BaseModel:
    """A registered base model: its name, the spec derived from ``config_json`` and the JSON itself."""

    name: str
    spec: ModelSpec
    config_json: str
    create_time: datetime


@dataclass(frozen=True)
class Adapter:
    """An adapter: a named series of versions for one base model. ``aliases`` maps alias -> version."""

    name: str
    namespace: str
    base_model: str
    description: str
    labels: Mapping[str, str]
    aliases: Mapping[str, int]
    latest_version: int | None
    etag: str
    create_time: datetime
    update_time: datetime


class VersionState(enum.Enum):
    """Only READY versions are ever visible through the service; the others exist for forward compatibility."""

    PENDING = "PENDING"
    READY = "READY"
    FAILED = "FAILED"


@dataclass(frozen=True)
class AdapterVersion:
    """One immutable upload. ``digest`` is the identity the engine caches by; ``weights_sha256`` names the blob."""

    adapter: str
    version: int
    digest: str
    weights_sha256: str
    size_bytes: int
    state: VersionState
    state_message: str
    rank: int
    module_ranks: Mapping[str, int]
    lora_alpha: float
    use_rslora: bool
    rank_pattern: Mapping[str, int]
    alpha_pattern: Mapping[str, float]
    target_modules: tuple[str, ...]
    dtype: str
    base_model: str
    adapter_config_json: str
    blob_key: str
    request_id: str
    aliases: tuple[str, ...]
    create_time: datetime


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing; an empty ``next_page_token`` means there is nothing more."""

    items: Sequence[T]
    next_page_token: str = ""


@dataclass(frozen=True)
class GcReport:
    """What a garbage collection pass removed (or, with dry_run, would remove), counted and in bytes.

    ``deleted`` are orphan blob keys; spool files are staged uploads of crashed or abandoned uploads; temp files
    are a local store's interrupted writes; multipart uploads are S3 uploads never completed (billed until aborted).
    """

    deleted: list[str] = field(default_factory=list)
    kept_recent: int = 0
    referenced: int = 0
    spool_files_deleted: int = 0
    deleted_bytes: int = 0
    spool_bytes: int = 0
    temp_files_deleted: int = 0
    multipart_uploads_aborted: int = 0
    incomplete_bytes: int = 0  # temp files + multipart parts

    @property
    def removed_count(self) -> int:
        return len(self.deleted) + self.spool_files_deleted + self.temp_files_deleted + self.multipart_uploads_aborted

    @property
    def removed_bytes(self) -> int:
        return self.deleted_bytes + self.spool_bytes + self.incomplete_bytes
