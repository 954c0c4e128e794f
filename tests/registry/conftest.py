"""Registry test fixtures: a migrated ``RegistryService`` on each back end, with the tiny base models registered."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from loraplex.registry.blobs import BlobStore, open_blob_store
from loraplex.registry.migrations import migrate
from loraplex.registry.service import RegistryLimits, RegistryService
from loraplex.registry.store import SqlMetadataStore
from tests.fixtures.backends import Backend


def build_service(backend: Backend, spool: Path, limits: RegistryLimits | None = None) -> RegistryService:
    migrate(backend.db_url)
    return RegistryService(
        SqlMetadataStore(backend.db_url),
        open_blob_store(backend.blobs_url, backend.s3_endpoint),
        limits or RegistryLimits(max_adapter_bytes=64 * 1024 * 1024),
        spool_dir=spool,
    )


@pytest.fixture
def service(registry_backend: Backend, tmp_path: Path, tiny_models: dict[str, Path]) -> Iterator[RegistryService]:
    """A fresh registry with ``tiny-llama``, ``tiny-mistral`` and ``tiny-qwen2`` registered."""
    svc = build_service(registry_backend, tmp_path / "spool")
    for arch, model_dir in tiny_models.items():
        svc.register_base_model(f"tiny-{arch}", (model_dir / "config.json").read_text())
    try:
        yield svc
    finally:
        svc.store.close()


@pytest.fixture
def blobs(service: RegistryService) -> BlobStore:
    return service.blobs


def model_config_json(tiny_models: dict[str, Path], arch: str) -> str:
    return (tiny_models[arch] / "config.json").read_text()


def config_dict(tiny_models: dict[str, Path], arch: str) -> dict[str, object]:
    loaded: dict[str, object] = json.loads(model_config_json(tiny_models, arch))
    return loaded
