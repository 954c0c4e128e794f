"""ModelSpec from real transformers configs, checked against the shapes of real instantiated modules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loraplex.registry.errors import InvalidArgument
from loraplex.registry.spec import ModelSpec
from tests.fixtures.hf import ARCHITECTURES, model_config


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_spec_matches_transformers_module_shapes(arch: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    config = model_config(arch, hidden_size=96, num_attention_heads=6, num_key_value_heads=2, intermediate_size=80)
    spec = ModelSpec.from_config(config.to_dict())
    assert spec.model_type == arch
    assert spec.architecture.lower().startswith(arch)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = spec.module_shapes()
    layer = model.model.layers[0]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        module = getattr(layer.self_attn, name)
        assert shapes[name] == (module.in_features, module.out_features), name
    for name in ("gate_proj", "up_proj", "down_proj"):
        module = getattr(layer.mlp, name)
        assert shapes[name] == (module.in_features, module.out_features), name
    embed = model.model.embed_tokens
    assert shapes["embed_tokens"] == (embed.num_embeddings, embed.embedding_dim)
    assert shapes["lm_head"] == (model.lm_head.in_features, model.lm_head.out_features)
    assert spec.num_hidden_layers == len(model.model.layers)


def test_explicit_head_dim_wins() -> None:
    config = model_config("mistral", head_dim=32).to_dict()
    spec = ModelSpec.from_config(config)
    assert spec.head_dim == 32
    assert spec.module_shapes()["q_proj"] == (64, 4 * 32)
    assert spec.module_shapes()["o_proj"] == (4 * 32, 64)


def test_saved_config_json_with_architectures(tiny_models: dict[str, Path]) -> None:
    for arch, model_dir in tiny_models.items():
        spec = ModelSpec.from_config(json.loads((model_dir / "config.json").read_text()))
        assert spec.model_type == arch
        assert spec.num_key_value_heads == 2


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel"),
        ({"model_type": "phi3"}, "phi3"),
        ({"architectures": ["LlamaForSequenceClassification"]}, "LlamaForSequenceClassification"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"hidden_size": "64"}, "hidden_size"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"hidden_size": 65, "head_dim": None}, "divisible"),
        ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
        ({"vocab_size": True}, "vocab_size"),
    ],
)
def test_bad_configs_name_the_problem(patch: dict[str, object], needle: str) -> None:
    config = model_config("llama").to_dict()
    config.update(patch)
    with pytest.raises(InvalidArgument) as info:
        ModelSpec.from_config(config)
    assert needle in info.value.message


def test_registry_service_imports_without_torch() -> None:
    code = (
        "import sys, loraplex.registry.service, loraplex.registry.peft_format, loraplex.registry.spec\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
