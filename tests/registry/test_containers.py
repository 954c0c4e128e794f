"""A core subset against PostgreSQL and MinIO in containers (skipped where no Docker engine answers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.backends import Backend
from tests.fixtures.hf import read_adapter
from tests.registry.conftest import build_service
from tests.registry.helpers import sha256, upload

pytestmark = pytest.mark.docker


def test_upload_resolve_download_on_containers(
    registry_backend_containers: Backend,
    tmp_path: Path,
    tiny_models: dict[str, Path],
    tiny_adapters: dict[str, dict[str, Path]],
) -> None:
    svc = build_service(registry_backend_containers, tmp_path / "spool")
    try:
        svc.register_base_model("tiny-llama", (tiny_models["llama"] / "config.json").read_text())
        svc.create_adapter("acme/c", "tiny-llama")
        config, weights = read_adapter(tiny_adapters["llama"]["all-r8"])
        version = upload(svc, "acme/c", config, weights, request_id="r1")
        assert svc.resolve("acme/c") == version
        _, chunks = svc.open_download("acme/c@1")
        assert sha256(b"".join(chunks)) == sha256(weights)
    finally:
        svc.store.close()
