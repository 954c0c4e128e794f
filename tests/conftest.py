"""Session-wide fixtures shared by every test package."""

from __future__ import annotations

from pathlib import Path

import pytest

# Backend fixtures (PostgreSQL from local binaries, S3 via a loopback moto server) live in their own module.
pytest_plugins = ["tests.fixtures.backends"]


@pytest.fixture(scope="session")
def hf_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder per test session for built models and adapters (built once, reused)."""
    return tmp_path_factory.mktemp("hf")


@pytest.fixture(scope="session")
def tiny_models(hf_root: Path) -> dict[str, Path]:
    """A tiny random Llama, Mistral and Qwen2, saved in the Hugging Face layout."""
    from tests.fixtures.hf import ARCHITECTURES, build_model

    return {arch: build_model(hf_root / f"model-{arch}", arch=arch, seed=i) for i, arch in enumerate(ARCHITECTURES)}


@pytest.fixture(scope="session")
def tiny_adapters(hf_root: Path, tiny_models: dict[str, Path]) -> dict[str, dict[str, Path]]:
    """Every adapter of the zoo, made with PEFT, for each tiny model: ``[arch][adapter_name] -> dir``."""
    from tests.fixtures.hf import ADAPTER_ZOO, build_adapter

    return {
        arch: {
            name: build_adapter(model_dir, hf_root / f"adapter-{arch}-{name}", spec)
            for name, spec in ADAPTER_ZOO.items()
        }
        for arch, model_dir in tiny_models.items()
    }
