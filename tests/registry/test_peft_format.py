"""PEFT format parsing against real adapters made by PEFT, with PEFT itself as the oracle for ranks and scales."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from loraplex.registry.errors import AdapterIncompatible, InvalidAdapter
from loraplex.registry.peft_format import (
    LoraKey,
    lora_key,
    parse_adapter_config,
    parse_lora_key,
    parse_safetensors_header,
    resolve_targets,
    validate_adapter,
)
from loraplex.registry.spec import ModelSpec
from tests.fixtures.hf import ADAPTER_ZOO, ARCHITECTURES, model_config
from tests.registry.helpers import build_safetensors, read_header, with_header

LLAMA = ModelSpec.from_config(model_config("llama").to_dict())


def _spec(tiny_models: dict[str, Path], arch: str) -> ModelSpec:
    return ModelSpec.from_config(json.loads((tiny_models[arch] / "config.json").read_text()))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_zoo_adapter_validates(
    arch: str, tiny_models: dict[str, Path], tiny_adapters: dict[str, dict[str, Path]]
) -> None:
    from safetensors import safe_open

    spec = _spec(tiny_models, arch)
    for name, zoo in ADAPTER_ZOO.items():
        adapter_dir = tiny_adapters[arch][name]
        config = parse_adapter_config((adapter_dir / "adapter_config.json").read_text())
        path = adapter_dir / "adapter_model.safetensors"
        with path.open("rb") as handle:
            tensors = parse_safetensors_header(handle, path.stat().st_size)
        # Oracle for the header parser: the safetensors library sees the same tensors, shapes and dtypes.
        with safe_open(str(path), framework="pt") as reference:
            assert set(reference.keys()) == set(tensors)
            for key in sorted(tensors):
                assert list(reference.get_slice(key).get_shape()) == list(tensors[key].shape)
        summary = validate_adapter(config, tensors, spec, max_rank=256)
        assert summary.dtype == "F32"
        assert summary.use_rslora == zoo.use_rslora
        assert set(summary.target_modules) == set(zoo.target_modules)
        assert summary.rank == max([zoo.r, *zoo.rank_pattern.values()])
        for module, rank in summary.module_ranks.items():
            assert rank == zoo.rank_pattern.get(module, zoo.r)


@pytest.mark.parametrize("adapter_name", ["pattern-r8", "attn-r16-rs", "embed-head-r8", "o-down-r12"])
def test_rank_and_scale_match_peft(
    adapter_name: str, tiny_models: dict[str, Path], tiny_adapters: dict[str, dict[str, Path]]
) -> None:
    """PEFT's own LoRA layers (r, scaling) are the oracle for rank_for / scale_for."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_dir = tiny_adapters["llama"][adapter_name]
    base = AutoModelForCausalLM.from_pretrained(str(tiny_models["llama"]), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir))
    config = parse_adapter_config((adapter_dir / "adapter_config.json").read_text())
    checked = 0
    for full_name, module in peft_model.base_model.model.named_modules():
        if not hasattr(module, "scaling") or "default" not in getattr(module, "r", {}):
            continue
        leaf = full_name.rsplit(".", 1)[-1]
        layer = int(full_name.split(".")[2]) if ".layers." in f".{full_name}" else None
        assert config.rank_for(leaf, layer) == module.r["default"], full_name
        assert config.scale_for(leaf, layer) == pytest.approx(module.scaling["default"]), full_name
        checked += 1
    assert checked > 0


def test_pattern_keys_with_layer_paths_and_regex() -> None:
    raw = {
        "peft_type": "LORA",
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["q_proj", "v_proj"],
        "rank_pattern": {"model.layers.1.self_attn.q_proj": 2, r"layers\.0\..*v_proj": 6},
        "alpha_pattern": {"q_proj": 4},
    }
    config = parse_adapter_config(json.dumps(raw))
    assert config.rank_for("q_proj", 0) == 8
    assert config.rank_for("q_proj", 1) == 2
    assert config.rank_for("v_proj", 0) == 6
    assert config.rank_for("v_proj", 1) == 8
    assert config.alpha_for("q_proj", 1) == 4
    assert config.scale_for("q_proj", 1) == pytest.approx(4 / 2)
    rs = parse_adapter_config(json.dumps({**raw, "use_rslora": True, "rank_pattern": {}, "alpha_pattern": {}}))
    assert rs.scale_for("q_proj", 0) == pytest.approx(16 / 8**0.5)


def test_target_module_regex_and_layers_to_transform_resolve_against_spec() -> None:
    regex = parse_adapter_config(
        json.dumps({"peft_type": "LORA", "r": 4, "target_modules": r".*layers\.1\.self_attn\.(q|v)_proj"})
    )
    assert set(resolve_targets(regex, LLAMA, 64)) == {("q_proj", 1), ("v_proj", 1)}
    layered = parse_adapter_config(
        json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["o_proj"], "layers_to_transform": [0]})
    )
    assert set(resolve_targets(layered, LLAMA, 64)) == {("o_proj", 0)}
    shorthand = parse_adapter_config(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": "all-linear"}))
    assert len(resolve_targets(shorthand, LLAMA, 64)) == 7 * LLAMA.num_hidden_layers
    nothing = parse_adapter_config(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": "foo.*"}))
    with pytest.raises(AdapterIncompatible):
        resolve_targets(nothing, LLAMA, 64)


def test_lora_key_round_trip() -> None:
    cases = [
        ("q_proj", 0, "A"),
        ("down_proj", 1, "B"),
        ("embed_tokens", None, "embedding_A"),
        ("embed_tokens", None, "embedding_B"),
        ("embed_tokens", None, "base_layer"),
        ("lm_head", None, "A"),
        ("lm_head", None, "base_layer"),
    ]
    for module, layer, part in cases:
        key = lora_key(module, layer, part)  # type: ignore[arg-type]
        assert parse_lora_key(key) == LoraKey(layer, module, part)  # type: ignore[arg-type]
    assert lora_key("v_proj", 3, "B") == "base_model.model.model.layers.3.self_attn.v_proj.lora_B.weight"


@pytest.mark.parametrize(
    ("key", "error"),
    [
        ("base_model.model.model.layers.0.self_attn.q_proj.weight", InvalidAdapter),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", InvalidAdapter),
        ("model.layers.0.self_attn.q_proj.lora_A.weight", InvalidAdapter),
        ("base_model.model.model.layers.01.self_attn.q_proj.lora_A.weight", InvalidAdapter),
        ("base_model.model.model.layers.0.mlp.q_proj.lora_A.weight", AdapterIncompatible),
        ("base_model.model.model.layers.0.input_layernorm.lora_A.weight", AdapterIncompatible),
        ("base_model.model.model.norm.lora_A.weight", InvalidAdapter),
    ],
)
def test_non_lora_keys(key: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_lora_key(key)


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({"peft_type": "IA3"}, "peft_type"),
        ({"use_dora": "yes"}, "use_dora"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "all"}, "bias"),
        ({"r": 0}, "r must"),
        ({"r": "8"}, "r must"),
        ({"lora_alpha": "x"}, "lora_alpha"),
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": "(unclosed"}, "regular expression"),
        ({"rank_pattern": {"q_proj": -1}}, "rank_pattern"),
        ({"layers_to_transform": ["0"]}, "layers_to_transform"),
    ],
)
def test_bad_adapter_configs(patch: dict[str, object], needle: str) -> None:
    raw = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], **patch}
    with pytest.raises(InvalidAdapter) as info:
        parse_adapter_config(json.dumps(raw))
    assert needle in info.value.message
    assert info.value.reason in ("INVALID_ADAPTER",)


def test_config_not_json() -> None:
    for text in ("{", "[]", "null", '"x"'):
        with pytest.raises(InvalidAdapter):
            parse_adapter_config(text)


def _simple_file() -> bytes:
    return build_safetensors({"a": ("F32", [2, 3]), "b": ("F16", [4])})


def test_header_parser_accepts_bytes_and_reports_absolute_offsets() -> None:
    data = _simple_file()
    tensors = parse_safetensors_header(data, len(data))
    (n,) = struct.unpack("<Q", data[:8])
    assert tensors["a"].start == 8 + n and tensors["a"].end == 8 + n + 24
    assert tensors["b"].shape == (4,) and tensors["b"].nbytes == 8


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda d: d[:5], id="shorter-than-prefix"),
        pytest.param(lambda d: d[:20], id="truncated-header"),
        pytest.param(lambda d: d[:-4], id="truncated-data"),
        pytest.param(lambda d: struct.pack("<Q", 2**40) + d[8:], id="header-len-huge"),
        pytest.param(lambda d: struct.pack("<Q", len(d)) + d[8:], id="header-len-past-eof"),
        pytest.param(lambda d: struct.pack("<Q", 4) + b"\xff\xfe{}" + d[12:], id="not-utf8"),
        pytest.param(lambda d: struct.pack("<Q", 2) + b"[]", id="not-object"),
        pytest.param(
            lambda d: with_header(d, {**read_header(d), "b": {**read_header(d)["b"], "data_offsets": [0, 8]}}),
            id="overlap",
        ),
        pytest.param(
            lambda d: with_header(d, {**read_header(d), "b": {**read_header(d)["b"], "data_offsets": [24, 40]}}),
            id="offset-out-of-range",
        ),
        pytest.param(
            lambda d: with_header(d, {**read_header(d), "b": {**read_header(d)["b"], "dtype": "F99"}}),
            id="unknown-dtype",
        ),
        pytest.param(
            lambda d: with_header(d, {**read_header(d), "b": {**read_header(d)["b"], "shape": [-4]}}),
            id="negative-dim",
        ),
        pytest.param(
            lambda d: with_header(d, {**read_header(d), "b": {**read_header(d)["b"], "shape": [5]}}),
            id="length-mismatch",
        ),
        pytest.param(
            lambda d: with_header(d, {**read_header(d), "__metadata__": {"format": 1}}),
            id="metadata-not-str",
        ),
        pytest.param(
            lambda d: with_header(d, {**read_header(d), "b": {**read_header(d)["b"], "extra": 1}}),
            id="extra-field",
        ),
    ],
)
def test_malformed_headers(mutate: object) -> None:
    data = mutate(_simple_file())  # type: ignore[operator]
    with pytest.raises(InvalidAdapter):
        parse_safetensors_header(data, len(data))


def test_duplicate_header_keys_rejected() -> None:
    raw = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    data = struct.pack("<Q", len(raw)) + raw + bytes(4)
    with pytest.raises(InvalidAdapter, match="repeats"):
        parse_safetensors_header(data, len(data))
