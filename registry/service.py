"""The registry's one API: validation and orchestration over the metadata store and the blob store.

Why a separate layer: the gRPC servicer calls only this (synchronously, via ``asyncio.to_thread``), the store
only persists what this layer has already validated, and every method either fully succeeds or changes nothing
visible. Uploads are two-phase so a bad request is refused from its header, before a single weight byte is read.
"""

from __future__ import annotations

import json
import re
import tempfile
import uuid
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from loraplex.registry.blobs import BlobStore, blob_key_for
from loraplex.registry.digest import canonical_config, version_digest
from loraplex.registry.entities import Adapter, AdapterVersion, BaseModel, GcReport, Page
from loraplex.registry.errors import AlreadyExists, InvalidAdapter, InvalidArgument
from loraplex.registry.failpoints import failpoint
from loraplex.registry.gc import SPOOL_PREFIX, collect_garbage
from loraplex.registry.pagination import decode_token, encode_token, fingerprint, page_limit
from loraplex.registry.peft_format import (
    LoraConfigInfo,
    parse_adapter_config,
    resolve_targets,
    validate_adapter,
)
from loraplex.registry.refs import (
    namespace_of,
    parse_ref,
    validate_adapter_name,
    validate_alias,
    validate_base_model_name,
    validate_labels,
    validate_namespace,
    validate_sha256_hex,
    validate_version_number,
)
from loraplex.registry.spec import ModelSpec
from loraplex.registry.store import NewVersion, SqlMetadataStore
from loraplex.registry.weights_check import CheckedWeights, SafetensorsStream, check_weights_file

GIB = 1024**3
MAX_DESCRIPTION_LEN = 4096
MAX_MODEL_CONFIG_BYTES = 1024 * 1024
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
UPDATABLE_PATHS = frozenset({"description", "labels"})


@dataclass(frozen=True)
class RegistryLimits:
    max_rank: int = 256
    max_adapter_bytes: int = 4 * GIB
    max_config_bytes: int = 1024 * 1024


@dataclass(frozen=True)
class UploadPlan:
    """Everything ``begin_upload`` checked; ``existing`` is the version ``request_id`` already produced, if any.

    An existing version whose config and size match is only a candidate: the weights decide (``finish_upload``
    compares digests), unless the caller declared their sha256 up front and it matches (``settled``).
    """

    adapter: str
    base_model: str
    spec: ModelSpec
    config: LoraConfigInfo
    adapter_config_json: str
    size_bytes: int
    expected_sha256: str
    request_id: str
    existing: AdapterVersion | None = None

    @property
    def settled(self) -> bool:
        """The retry provably carries the existing version's content: answer it without reading the weights."""
        return self.existing is not None and self.expected_sha256 == self.existing.weights_sha256

    def weights_stream(self) -> SafetensorsStream:
        """The streaming checks to feed the weight bytes through as they arrive (see ``finish_upload``)."""
        return SafetensorsStream(self.size_bytes)


def _description(text: str) -> str:
    if not isinstance(text, str) or len(text) > MAX_DESCRIPTION_LEN:
        raise InvalidArgument(f"description must be a string of at most {MAX_DESCRIPTION_LEN} chars")
    return text


class RegistryService:
    """Synchronous and thread-safe; every method raises only the typed errors of ``registry.errors``."""

    def __init__(
        self,
        store: SqlMetadataStore,
        blobs: BlobStore,
        limits: RegistryLimits | None = None,
        spool_dir: Path | None = None,
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.limits = limits or RegistryLimits()
        self.spool_dir = Path(spool_dir) if spool_dir else Path(tempfile.gettempdir()) / "loraplex-spool"
        self.spool_dir.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- base models

    def register_base_model(self, name: str, config_json: str) -> BaseModel:
        """Register a base model from its ``config.json``; the same config again returns the existing entry."""
        validate_base_model_name(name)
        if not isinstance(config_json, str) or len(config_json.encode()) > MAX_MODEL_CONFIG_BYTES:
            raise InvalidArgument(f"config_json must be a JSON string of at most {MAX_MODEL_CONFIG_BYTES} bytes")
        try:
            config = json.loads(config_json)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise InvalidArgument(f"config_json is not valid JSON: {exc}", reason="INVALID_MODEL_CONFIG") from None
        ModelSpec.from_config(config)
        return self.store.add_base_model(name, config_json)

    def get_base_model(self, name: str) -> BaseModel:
        return self.store.get_base_model(validate_base_model_name(name))

    def list_base_models(self, page_size: int = 0, page_token: str = "") -> Page[BaseModel]:
        limit = page_limit(page_size)
        after = decode_token(page_token, "base_models", "")
        if after is not None and not isinstance(after, str):
            raise InvalidArgument("invalid page_token", reason="INVALID_PAGE_TOKEN")
        rows = self.store.list_base_models(after, limit + 1)
        token = encode_token("base_models", rows[limit - 1].name, "") if len(rows) > limit else ""
        return Page(rows[:limit], token)

    # ---------------------------------------------------------------- adapters

    def create_adapter(
        self, name: str, base_model: str, description: str = "", labels: Mapping[str, str] | None = None
    ) -> Adapter:
        validate_adapter_name(name)
        validate_base_model_name(base_model)
        return self.store.create_adapter(
            name, namespace_of(name), base_model, _description(description), validate_labels(labels or {})
        )

    def get_adapter(self, name: str) -> Adapter:
        return self.store.get_adapter(validate_adapter_name(name))

    def list_adapters(
        self,
        page_size: int = 0,
        page_token: str = "",
        base_model: str | None = None,
        labels: Mapping[str, str] | None = None,
        namespaces: Collection[str] | None = None,
    ) -> Page[Adapter]:
        """Adapters in name order; ``namespaces=None`` means all (the servicer narrows it for tenancy)."""
        limit = page_limit(page_size)
        if base_model:
            validate_base_model_name(base_model)
        label_filter = validate_labels(labels or {})
        ns = None if namespaces is None else sorted({validate_namespace(n) for n in namespaces})
        filters = fingerprint(base_model or "", label_filter, ns)
        after = decode_token(page_token, "adapters", filters)
        if after is not None and not isinstance(after, str):
            raise InvalidArgument("invalid page_token", reason="INVALID_PAGE_TOKEN")
        if ns == []:
            return Page([], "")
        rows = self.store.list_adapters(after, limit + 1, base_model or None, label_filter, ns)
        token = encode_token("adapters", rows[limit - 1].name, filters) if len(rows) > limit else ""
        return Page(rows[:limit], token)

    def update_adapter(
        self,
        name: str,
        *,
        paths: Sequence[str],
        description: str | None = None,
        labels: Mapping[str, str] | None = None,
        etag: str = "",
    ) -> Adapter:
        """Field-mask update of description and/or labels; a non-empty stale etag is a ``Conflict``."""
        validate_adapter_name(name)
        fields = set(paths)
        if not fields or not fields <= UPDATABLE_PATHS:
            raise InvalidArgument(
                f"update paths must be a non-empty subset of {sorted(UPDATABLE_PATHS)}, got {sorted(fields)}",
                reason="INVALID_FIELD_MASK",
            )
        new_description = _description(description or "") if "description" in fields else None
        new_labels = validate_labels(labels or {}) if "labels" in fields else None
        return self.store.update_adapter(name, new_description, new_labels, etag)

    def delete_adapter(self, name: str, *, etag: str = "", force: bool = False) -> None:
        """Delete an adapter (with ``force``, also its versions and aliases); its blobs are left for gc."""
        self.store.delete_adapter(validate_adapter_name(name), etag, force)

    # ---------------------------------------------------------------- uploads

    def new_spool_file(self) -> Path:
        """A fresh empty file in the spool directory (same filesystem as the local blob store's temp files)."""
        path = self.spool_dir / f"{SPOOL_PREFIX}{uuid.uuid4().hex}"
        path.touch(exist_ok=False)
        return path

    def begin_upload(
        self,
        adapter: str,
        config_json: str,
        size_bytes: int,
        expected_sha256: str = "",
        request_id: str = "",
    ) -> UploadPlan:
        """Check everything knowable before the weights arrive; an idempotent retry carries ``existing``."""
        validate_adapter_name(adapter)
        if not isinstance(config_json, str) or len(config_json.encode()) > self.limits.max_config_bytes:
            raise InvalidArgument(
                f"adapter_config.json must be at most {self.limits.max_config_bytes} bytes", reason="CONFIG_TOO_LARGE"
            )
        if isinstance(size_bytes, bool) or not isinstance(size_bytes, int) or size_bytes <= 0:
            raise InvalidArgument(f"size_bytes must be a positive integer, got {size_bytes!r}", reason="INVALID_SIZE")
        if size_bytes > self.limits.max_adapter_bytes:
            raise InvalidArgument(
                f"adapter weights of {size_bytes} bytes exceed the limit of {self.limits.max_adapter_bytes}",
                reason="ADAPTER_TOO_LARGE",
            )
        if expected_sha256:
            validate_sha256_hex(expected_sha256, "expected_sha256")
        if request_id and (not isinstance(request_id, str) or not REQUEST_ID_RE.fullmatch(request_id)):
            raise InvalidArgument("request_id must be 1-128 chars of [A-Za-z0-9._:-]", reason="INVALID_REQUEST_ID")
        entity = self.store.get_adapter(adapter)
        base = self.store.get_base_model(entity.base_model)
        config = parse_adapter_config(config_json)
        resolve_targets(config, base.spec, self.limits.max_rank)
        existing = self.store.find_version_by_request_id(adapter, request_id) if request_id else None
        if existing is not None and (
            canonical_config(config_json) != canonical_config(existing.adapter_config_json)
            or size_bytes != existing.size_bytes
            or (expected_sha256 and expected_sha256 != existing.weights_sha256)
        ):
            raise _request_id_reused(request_id, existing)
        return UploadPlan(
            adapter=adapter,
            base_model=base.name,
            spec=base.spec,
            config=config,
            adapter_config_json=config_json,
            size_bytes=size_bytes,
            expected_sha256=expected_sha256,
            request_id=request_id,
            existing=existing,
        )

    def finish_upload(
        self, plan: UploadPlan, weights_path: Path, weights_sha256: str, checked: CheckedWeights | None = None
    ) -> AdapterVersion:
        """Validate the spooled weights, store the blob, then commit the READY version (numbered 1, 2, ...).

        ``weights_sha256`` is the hash the servicer computed while spooling; the blob is stored under it.
        ``checked`` is what ``plan.weights_stream()`` returned after the caller fed it every byte while
        spooling; without it the file is read once more for the same checks (header rules, finite weights).
        A ``request_id`` that already made a version returns it when the content is the same, and is
        ALREADY_EXISTS (``REQUEST_ID_REUSED``) when it is not: the upload is never silently dropped.
        """
        validate_sha256_hex(weights_sha256, "weights sha256")
        size = Path(weights_path).stat().st_size
        if size != plan.size_bytes:
            raise InvalidAdapter(
                f"received {size} bytes of weights but {plan.size_bytes} were declared", reason="SIZE_MISMATCH"
            )
        if plan.expected_sha256 and plan.expected_sha256 != weights_sha256:
            raise InvalidAdapter(
                f"weights sha256 {weights_sha256} does not match the declared {plan.expected_sha256}",
                reason="CHECKSUM_MISMATCH",
            )
        if plan.existing is not None:
            if plan.existing.digest != version_digest(plan.adapter_config_json, weights_sha256):
                raise _request_id_reused(plan.request_id, plan.existing)
            return plan.existing
        if checked is None:
            checked = check_weights_file(Path(weights_path), size)
        elif checked.size != size:
            raise InvalidArgument(f"checked {checked.size} bytes of weights but the file has {size}")
        summary = validate_adapter(plan.config, checked.tensors, plan.spec, self.limits.max_rank, allow_dora=True)
        key = blob_key_for(weights_sha256)
        self.blobs.put_file(key, Path(weights_path))
        failpoint("after-blob-put")
        version = self.store.add_version(
            plan.adapter,
            NewVersion(
                digest=version_digest(plan.adapter_config_json, weights_sha256),
                weights_sha256=weights_sha256,
                blob_key=key,
                size_bytes=size,
                rank=summary.rank,
                module_ranks=summary.module_ranks,
                lora_alpha=summary.lora_alpha,
                use_rslora=summary.use_rslora,
                rank_pattern=summary.rank_pattern,
                alpha_pattern=summary.alpha_pattern,
                target_modules=summary.target_modules,
                dtype=summary.dtype,
                adapter_config_json=plan.adapter_config_json,
                request_id=plan.request_id,
            ),
        )
        if not self.blobs.exists(key):  # a gc raced us between put and commit: the row needs its blob
            self.blobs.put_file(key, Path(weights_path))
        return version

    # ---------------------------------------------------------------- versions + aliases

    def get_version(self, adapter: str, version: int) -> AdapterVersion:
        return self.store.get_version(validate_adapter_name(adapter), validate_version_number(version))

    def list_versions(self, adapter: str, page_size: int = 0, page_token: str = "") -> Page[AdapterVersion]:
        """Versions newest first."""
        validate_adapter_name(adapter)
        limit = page_limit(page_size)
        before = decode_token(page_token, "versions", fingerprint(adapter))
        if before is not None and not isinstance(before, int):
            raise InvalidArgument("invalid page_token", reason="INVALID_PAGE_TOKEN")
        rows = self.store.list_versions(adapter, before, limit + 1)
        token = encode_token("versions", rows[limit - 1].version, fingerprint(adapter)) if len(rows) > limit else ""
        return Page(rows[:limit], token)

    def delete_version(self, adapter: str, version: int) -> None:
        """Remove a version (refused while a user alias points at it); ``latest`` moves to the next newest."""
        self.store.delete_version(validate_adapter_name(adapter), validate_version_number(version))

    def set_alias(self, adapter: str, alias: str, version: int) -> Adapter:
        return self.store.set_alias(
            validate_adapter_name(adapter), validate_alias(alias), validate_version_number(version)
        )

    def delete_alias(self, adapter: str, alias: str) -> Adapter:
        return self.store.delete_alias(validate_adapter_name(adapter), validate_alias(alias))

    # ---------------------------------------------------------------- serving path

    def resolve(self, ref: str) -> AdapterVersion:
        """``ns/name[@version|@alias|@latest|@sha256:...]`` -> the READY version it names (two indexed queries)."""
        return self.store.resolve(parse_ref(ref))

    def open_download(self, ref: str, offset: int = 0) -> tuple[AdapterVersion, Iterator[bytes]]:
        """The resolved version and its weight bytes from ``offset`` (``offset == size`` -> no bytes)."""
        version = self.resolve(ref)
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= version.size_bytes:
            raise InvalidArgument(f"offset must be in 0..{version.size_bytes}, got {offset!r}", reason="INVALID_OFFSET")
        if offset == version.size_bytes:
            return version, iter(())
        return version, self.blobs.open_range(version.blob_key, offset)

    def gc(self, grace_seconds: float = 3600, dry_run: bool = False) -> GcReport:
        """Delete unreferenced blobs and spool files older than ``grace_seconds``."""
        if isinstance(grace_seconds, bool) or not isinstance(grace_seconds, int | float) or grace_seconds < 0:
            raise InvalidArgument(f"grace_seconds must be a non-negative number, got {grace_seconds!r}")
        return collect_garbage(self.store, self.blobs, self.spool_dir, float(grace_seconds), dry_run)


def _request_id_reused(request_id: str, existing: AdapterVersion) -> AlreadyExists:
    return AlreadyExists(
        f"request_id {request_id!r} was already used for a different upload (version {existing.version} of "
        f"{existing.adapter}): retry with the same content, or use a new request_id",
        reason="REQUEST_ID_REUSED",
    )


def hash_file(path: Path) -> str:
    """sha256 hex of a file, in 1 MiB reads (for callers that did not hash while spooling)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


__all__ = ["RegistryLimits", "RegistryService", "UploadPlan", "hash_file"]
