"""DoRA adapters made by PEFT are accepted and validated like A/B; LoRA scales are bounded per module.

PEFT is the oracle for the DoRA tensor names and shapes (``LoraConfig(use_dora=True)`` + ``save_pretrained``) and
for the per-module scales the bound is checked against.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from loraplex.registry.errors import AdapterIncompatible, InvalidAdapter
from loraplex.registry.peft_format import (
    MAX_LORA_SCALE,
    LoraKey,
    lora_key,
    parse_adapter_config,
    parse_lora_key,
    resolve_targets,
    validate_adapter,
)
from loraplex.registry.safetensors_header import parse_safetensors_header
from loraplex.registry.service import RegistryService
from loraplex.registry.spec import ModelSpec
from tests.fixtures.hf import ALL_LINEAR, ARCHITECTURES, AdapterSpec, build_adapter, model_config, read_adapter
from tests.registry.helpers import build_safetensors, entries_of, upload

LLAMA = ModelSpec.from_config(model_config("llama").to_dict())
DORA_SPEC = AdapterSpec(r=4, lora_alpha=8, target_modules=tuple(ALL_LINEAR), use_dora=True, seed=11)
MAG0 = "base_model.model.model.layers.0.self_attn.v_proj.lora_magnitude_vector"


@pytest.fixture(scope="module")
def dora_adapters(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dora")
    return {arch: build_adapter(tiny_models[arch], root / arch, DORA_SPEC) for arch in ARCHITECTURES}


def _spec(tiny_models: dict[str, Path], arch: str) -> ModelSpec:
    return ModelSpec.from_config(json.loads((tiny_models[arch] / "config.json").read_text()))


# -- DoRA ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_peft_dora_adapters_validate_with_magnitudes(
    arch: str, dora_adapters: dict[str, Path], tiny_models: dict[str, Path]
) -> None:
    from safetensors import safe_open

    spec = _spec(tiny_models, arch)
    config_text, weights = read_adapter(dora_adapters[arch])
    config = parse_adapter_config(config_text)
    assert config.use_dora is True
    tensors = parse_safetensors_header(weights, len(weights))
    with safe_open(str(dora_adapters[arch] / "adapter_model.safetensors"), framework="pt") as reference:
        magnitudes = {k: list(reference.get_slice(k).get_shape()) for k in reference.keys() if "magnitude" in k}  # noqa: SIM118
    # PEFT writes one [out_features] magnitude per adapted module; our key grammar and shapes say the same.
    assert len(magnitudes) == spec.num_hidden_layers * len(ALL_LINEAR)
    for name, shape in magnitudes.items():
        key = parse_lora_key(name)
        assert key.part == "magnitude" and lora_key(key.module, key.layer, "magnitude") == name
        assert shape == [spec.module_shapes()[key.module][1]], name
    summary = validate_adapter(config, tensors, spec, max_rank=64, allow_dora=True)
    assert summary.use_dora and set(summary.target_modules) == set(ALL_LINEAR)
    # A loader without DoRA math keeps the default and refuses, instead of serving it as plain LoRA.
    with pytest.raises(AdapterIncompatible, match="DoRA"):
        validate_adapter(config, tensors, spec, max_rank=64)


def _mutated(weights: bytes, edit: object) -> bytes:
    entries = entries_of(weights)
    edit(entries)  # type: ignore[operator]
    return build_safetensors(entries)


@pytest.mark.parametrize(
    ("edit", "error", "needle"),
    [
        (lambda e: e.pop(MAG0), InvalidAdapter, "is missing"),
        (lambda e: e.__setitem__(MAG0, ("F32", [64])), AdapterIncompatible, "expected [32]"),
        (lambda e: e.__setitem__(MAG0, ("F32", [32, 1])), InvalidAdapter, "1 dimension"),
        (
            lambda e: e.__setitem__(MAG0.replace("layers.0", "layers.7"), ("F32", [32])),
            AdapterIncompatible,
            "layer 7",
        ),
    ],
    ids=["missing", "wrong-length", "two-dims", "layer-out-of-range"],
)
def test_bad_dora_magnitudes_are_refused(
    edit: object, error: type[Exception], needle: str, dora_adapters: dict[str, Path], tiny_models: dict[str, Path]
) -> None:
    config_text, weights = read_adapter(dora_adapters["llama"])
    bad = _mutated(weights, edit)
    with pytest.raises(error) as info:
        validate_adapter(
            parse_adapter_config(config_text),
            parse_safetensors_header(bad, len(bad)),
            _spec(tiny_models, "llama"),
            64,
            allow_dora=True,
        )
    assert needle in str(info.value)


def test_magnitudes_without_use_dora_are_refused(dora_adapters: dict[str, Path], tiny_models: dict[str, Path]) -> None:
    config_text, weights = read_adapter(dora_adapters["llama"])
    plain = parse_adapter_config(json.dumps(json.loads(config_text) | {"use_dora": False}))
    with pytest.raises(InvalidAdapter, match="does not set use_dora"):
        validate_adapter(plain, parse_safetensors_header(weights, len(weights)), _spec(tiny_models, "llama"), 64)


@pytest.mark.parametrize("module", ["embed_tokens", "lm_head"])
def test_dora_on_embeddings_is_refused_with_the_reason(module: str) -> None:
    config = parse_adapter_config(
        json.dumps(
            {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": True, "target_modules": ["q_proj", module]}
        )
    )
    with pytest.raises(InvalidAdapter) as info:
        resolve_targets(config, LLAMA, 64)
    assert f"DoRA (use_dora=true) on {module} is not supported" in info.value.message
    assert parse_lora_key(
        f"base_model.model.{'model.' if module == 'embed_tokens' else ''}{module}.lora_magnitude_vector"
    ) == (LoraKey(None, module, "magnitude"))


def test_dora_upload_round_trips(service: RegistryService, dora_adapters: dict[str, Path]) -> None:
    config, weights = read_adapter(dora_adapters["qwen2"])
    service.create_adapter("acme/dora", "tiny-qwen2")
    version = upload(service, "acme/dora", config, weights)
    assert version.version == 1 and version.rank == 4
    assert parse_adapter_config(version.adapter_config_json).use_dora
    _, chunks = service.open_download("acme/dora")
    assert b"".join(chunks) == weights


# -- scales ----------------------------------------------------------------------------------------------------
def _config(**fields: object) -> str:
    return json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": list(ALL_LINEAR), **fields})


@pytest.mark.parametrize(
    ("fields", "accepted"),
    [
        ({}, True),
        ({"lora_alpha": 8 * MAX_LORA_SCALE}, True),  # exactly at the bound
        ({"lora_alpha": 8 * MAX_LORA_SCALE + 1}, False),
        ({"lora_alpha": -8 * MAX_LORA_SCALE - 1}, False),  # the bound is on the magnitude
        ({"lora_alpha": 1e308}, False),
        ({"lora_alpha": 1e308, "alpha_pattern": {".*_proj": 16}}, True),  # every targeted module overridden
        ({"alpha_pattern": {"v_proj": 1e6}}, False),
        ({"alpha_pattern": {"lm_head": 1e9}}, True),  # lm_head is not targeted: its scale is never used
        ({"lora_alpha": 20000, "rank_pattern": {"o_proj": 1}}, False),  # 20000 / 1 for o_proj only
        ({"lora_alpha": 20000, "rank_pattern": {"o_proj": 1}, "exclude_modules": ["o_proj"]}, True),
        ({"use_rslora": True, "lora_alpha": 28000}, True),  # 28000 / sqrt(8) = 9899
        ({"use_rslora": True, "lora_alpha": 29000}, False),  # 10253
        ({"use_rslora": True, "lora_alpha": 1e308, "rank_pattern": {"q_proj": 1}}, False),
    ],
)
def test_every_targeted_modules_scale_is_bounded(fields: dict[str, object], accepted: bool) -> None:
    config = parse_adapter_config(_config(**fields))
    scales = [
        config.scale_for(m, i) for i in range(LLAMA.num_hidden_layers) for m in ALL_LINEAR if config.targets(m, i)
    ]
    assert all(math.isfinite(s) for s in scales)
    assert (max(abs(s) for s in scales) <= MAX_LORA_SCALE) is accepted
    if accepted:
        resolve_targets(config, LLAMA, 256)
        return
    with pytest.raises(InvalidAdapter) as info:
        resolve_targets(config, LLAMA, 256)
    assert info.value.reason == "LORA_SCALE_OUT_OF_RANGE" and "must be finite" in info.value.message


def test_scale_bound_matches_peft_scaling(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """PEFT's own ``scaling`` for an rsLoRA adapter with patterns is what the bound is checked against."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec = AdapterSpec(
        r=8, lora_alpha=20000, target_modules=("q_proj", "v_proj"), use_rslora=True, rank_pattern={"v_proj": 2}
    )
    folder = build_adapter(tiny_models["llama"], tmp_path / "big-scale", spec)
    config = parse_adapter_config((folder / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(str(tiny_models["llama"]), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(folder))
    scalings = {
        name: module.scaling["default"]
        for name, module in model.named_modules()
        if isinstance(getattr(module, "scaling", None), dict) and "default" in module.scaling
    }
    assert max(scalings.values()) == pytest.approx(20000 / math.sqrt(2))  # v_proj: over the bound
    with pytest.raises(InvalidAdapter) as info:
        resolve_targets(config, _spec(tiny_models, "llama"), 256)
    assert "v_proj" in info.value.message and "sqrt(2)" in info.value.message
