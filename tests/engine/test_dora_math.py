"""DoRA's per-column factor against PEFT's own DoRA layers, from real ``save_pretrained`` files.

Each PEFT ``lora.Linear`` (or ``lora.Embedding``) with ``use_dora=True`` is run on random inputs and compared
with ``f ⊙ (W·x + s·B·A·x) + bias``, where W and bias come from the ENGINE's model (fused, transposed
storage, through ``base_weights.locate``) and A, B, s, m from the engine's parse of the adapter files.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch

from loraplex.engine.adapters.base_weights import locate
from loraplex.engine.adapters.dora import (
    apply_dora_factor,
    dora_column_factor,
    dora_factors,
    magnitude_key,
    parse_magnitude_key,
    split_dora_tensors,
    validate_magnitudes,
)
from loraplex.engine.adapters.host import HostAdapter
from loraplex.engine.adapters.types import ModuleKey, ModuleLoRA
from loraplex.engine.model.build import LoadedModel, load_model
from loraplex.registry.errors import AdapterIncompatible, InvalidAdapter
from tests.engine.helpers import peft_model
from tests.fixtures.hf import ALL_LINEAR, AdapterSpec
from tests.fixtures.peft_variants import (
    build_dora_adapter,
    build_model_with_biases,
    load_dora_adapter,
    peft_layers,
)

# Qwen2 (with random q/k/v biases: transformers initialises them to zero, which would hide where the bias goes)
# all linear modules with rank/alpha patterns; Llama: rsLoRA, embeddings and the LM head.
DORA_SPECS = {
    "qwen2": AdapterSpec(
        r=8, lora_alpha=16, target_modules=tuple(ALL_LINEAR), rank_pattern={"q_proj": 4}, alpha_pattern={"v_proj": 32.0}
    ),
    "llama": AdapterSpec(
        r=4, lora_alpha=8, target_modules=("embed_tokens", "q_proj", "v_proj", "down_proj", "lm_head"), use_rslora=True
    ),
}
TOKENS = 6


@pytest.fixture(scope="module")
def dora_case(
    request: pytest.FixtureRequest, tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[LoadedModel, HostAdapter, dict[ModuleKey, torch.Tensor], dict[ModuleKey, object]]:
    arch = request.param
    root = tmp_path_factory.mktemp(f"dora-{arch}")
    model_dir = build_model_with_biases(root / "model", arch, seed=3) if arch == "qwen2" else tiny_models[arch]
    folder = build_dora_adapter(model_dir, root / "adapter", DORA_SPECS[arch], 7)
    loaded = load_model(model_dir, "float32", torch.device("cpu"), None)
    host, magnitudes = load_dora_adapter(folder, loaded.spec)
    oracle = peft_model(model_dir, {"dora": folder})
    return loaded, host, magnitudes, peft_layers(oracle)


def _inputs(key: ModuleKey, h_in: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))
    if key == (None, "embed_tokens"):
        return torch.randint(0, vocab, (TOKENS,), generator=g)
    return torch.randn(TOKENS, h_in, generator=g)


def _engine_dora(
    loaded: LoadedModel, key: ModuleKey, lora: ModuleLoRA, f: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """The engine's per-token math: base output (bias included) + s·B·A·x, then ``apply_dora_factor``."""
    sl = locate(loaded.model, key)
    w = sl.weight()  # [h_out, h_in]
    if key == (None, "embed_tokens"):
        y = w.t()[x] + lora.scale * (lora.a.t()[x] @ lora.b.t())
    else:
        y = x @ w.t() + lora.scale * (x @ lora.a.t()) @ lora.b.t()
        if sl.bias is not None:
            y = y + sl.bias
    return apply_dora_factor(y, f, sl.bias)


@pytest.mark.parametrize("dora_case", ["qwen2", "llama"], indirect=True)
def test_factor_reproduces_peft_dora_layers(dora_case: tuple[LoadedModel, HostAdapter, dict, dict]) -> None:
    loaded, host, magnitudes, layers = dora_case
    factors = dora_factors(loaded.model, host.modules, magnitudes)
    assert set(factors) == set(host.modules) == set(layers)
    for key, lora in host.modules.items():
        x = _inputs(key, int(lora.a.shape[1]), loaded.args.vocab_size)
        with torch.no_grad():
            want = layers[key](x)
        got = _engine_dora(loaded, key, lora, factors[key], x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=f"{key}")
        # The magnitudes were moved off PEFT's init, so the factor is really exercised.
        assert (factors[key] - 1).abs().max() > 0.05


@pytest.mark.parametrize("dora_case", ["qwen2"], indirect=True)
def test_bias_stays_outside_the_scaling(dora_case: tuple[LoadedModel, HostAdapter, dict, dict]) -> None:
    """The q/k/v biases make the placement visible: scaling them too would miss PEFT by far more than 1e-5."""
    loaded, host, magnitudes, layers = dora_case
    factors = dora_factors(loaded.model, host.modules, magnitudes)
    for module in ("q_proj", "k_proj", "v_proj"):
        key: ModuleKey = (0, module)
        sl, lora = locate(loaded.model, key), host.modules[key]
        assert sl.bias is not None and sl.bias.abs().max() > 0
        x = _inputs(key, int(lora.a.shape[1]), loaded.args.vocab_size)
        with torch.no_grad():
            want = layers[key](x)
        wrong = factors[key] * (x @ sl.weight().t() + sl.bias + lora.scale * (x @ lora.a.t()) @ lora.b.t())
        assert (wrong - want).abs().max() > 1e-3


def test_magnitude_keys_and_validation(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    folder = build_dora_adapter(
        tiny_models["qwen2"], tmp_path / "d", AdapterSpec(r=2, target_modules=("q_proj", "o_proj"))
    )
    loaded = load_model(tiny_models["qwen2"], "float32", torch.device("cpu"), None)
    host, magnitudes = load_dora_adapter(folder, loaded.spec)
    assert set(magnitudes) == set(host.modules) == {(i, m) for i in (0, 1) for m in ("q_proj", "o_proj")}
    for (layer, module), m in magnitudes.items():
        assert parse_magnitude_key(magnitude_key(module, layer)) == (layer, module)
        assert m.shape == (host.modules[(layer, module)].b.shape[0],)
    validate_magnitudes(magnitudes, host.modules)

    missing = dict(magnitudes)
    del missing[(1, "o_proj")]
    with pytest.raises(InvalidAdapter, match=r"layers\.1\.self_attn\.o_proj\.lora_magnitude_vector.*missing"):
        validate_magnitudes(missing, host.modules)
    with pytest.raises(InvalidAdapter, match="expected \\[64\\]"):
        validate_magnitudes({**magnitudes, (0, "q_proj"): torch.ones(63)}, host.modules)
    with pytest.raises(InvalidAdapter, match="non-finite"):
        validate_magnitudes({**magnitudes, (0, "q_proj"): torch.full((64,), float("nan"))}, host.modules)
    with pytest.raises(InvalidAdapter, match="no LoRA A/B pair"):
        validate_magnitudes({**magnitudes, (0, "v_proj"): torch.ones(32)}, host.modules)
    with pytest.raises(AdapterIncompatible, match="input_layernorm"):
        parse_magnitude_key("base_model.model.model.layers.0.input_layernorm.lora_magnitude_vector")
    rest, mags = split_dora_tensors({"x.lora_A.weight": torch.ones(1), magnitude_key("lm_head", None): torch.ones(1)})
    assert list(rest) == ["x.lora_A.weight"] and list(mags) == [(None, "lm_head")]


def test_zero_norm_is_refused_not_nan() -> None:
    weight = torch.zeros(3, 4)
    a, b = torch.ones(1, 4), torch.zeros(3, 1)
    with pytest.raises(AdapterIncompatible, match="norm is zero"):
        dora_column_factor(weight, a, b, 1.0, torch.ones(3))
