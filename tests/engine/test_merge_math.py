"""Folding one adapter into the engine's base weights, against PEFT ``merge_and_unload``.

The engine runs with NO adapter requests after the merge: its base rows must then be PEFT's merged model
(greedy tokens equal, fp32 logits within 1e-4). The negated delta, run as an ordinary adapter of the existing
engine, must give back the unmerged base (and, CAT-mixed with another adapter, that adapter), which is what the
integration will do per token. Unmerge must restore every parameter bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from loraplex.engine.adapters.dora import dora_factors
from loraplex.engine.adapters.host import HostAdapter
from loraplex.engine.adapters.merge import merge_adapter, unmerge_adapter
from loraplex.engine.adapters.mix import Mix, MixMember, MixMethod, mix_modules
from loraplex.engine.adapters.types import ModuleKey, ModuleLoRA
from loraplex.engine.core import EngineCore
from loraplex.engine.model.build import load_model
from loraplex.registry.errors import FailedPrecondition
from tests.engine.helpers import BASE, drive, make_core, peft_model, prompts, request, tokens, until_eos
from tests.fixtures.hf import ALL_LINEAR, AdapterSpec, build_adapter, build_model
from tests.fixtures.peft_variants import build_dora_adapter, load_dora_adapter

HOT = AdapterSpec(
    r=8,
    lora_alpha=16,
    target_modules=(*ALL_LINEAR, "embed_tokens", "lm_head"),
    rank_pattern={"k_proj": 4},
    alpha_pattern={"up_proj": 40.0},
    seed=31,
)
OTHER = AdapterSpec(r=6, lora_alpha=12, target_modules=("q_proj", "v_proj", "down_proj"), seed=32)
NEW_TOKENS = 6
PROMPT_LEN = 5
EOS = 1


def _hf_greedy(model: Any, batch: list[list[int]]) -> tuple[list[list[int]], torch.Tensor, tuple[torch.Tensor, ...]]:
    input_ids = torch.tensor(batch)
    with torch.no_grad():
        prefill = model(input_ids).logits[:, -1].float()
        out = model.generate(
            input_ids, do_sample=False, max_new_tokens=NEW_TOKENS, output_logits=True, return_dict_in_generate=True
        )
    want = [until_eos(row[PROMPT_LEN:].tolist(), EOS) for row in out.sequences]
    return want, prefill, out.logits


def _assert_engine_matches(core: EngineCore, adapter: str, batch: list[list[int]], hf: Any) -> None:
    want, prefill, steps = _hf_greedy(hf, batch)
    reqs = [request(f"r{i}", p, adapter, max_new_tokens=NEW_TOKENS) for i, p in enumerate(batch)]
    deltas, logits = drive(core, reqs, record_logits=True)
    for i in range(len(batch)):
        assert tokens(deltas[f"r{i}"]) == want[i], f"row {i}"
        torch.testing.assert_close(logits[0][f"r{i}"], prefill[i], atol=1e-4, rtol=0)
        for k in range(1, min(len(logits), NEW_TOKENS)):
            if f"r{i}" in logits[k]:
                torch.testing.assert_close(logits[k][f"r{i}"], steps[k][i].float(), atol=1e-4, rtol=0)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = dict(model.named_parameters())
    assert set(after) == set(before)
    for name, p in after.items():
        assert torch.equal(p, before[name]), name


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_merged_engine_equals_peft_merge_and_unload(arch: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model_dir = tiny_models[arch]
    hot_dir = build_adapter(model_dir, tmp_path / "hot", HOT)
    other_dir = build_adapter(model_dir, tmp_path / "other", OTHER)
    batch = prompts(3, PROMPT_LEN, seed=5)

    core = make_core(model_dir)
    model = core.loaded.model
    before = _snapshot(model)
    hot = HostAdapter.from_peft_dir(hot_dir, core.loaded.spec, 64)
    merged = merge_adapter(model, hot.modules)
    assert set(merged.originals) == set(hot.modules) == set(merged.negated)
    # Only the merged modules' regions are kept: k_proj's saved copy is [h_out=32, h_in=64], not the fused qkv.
    assert merged.originals[(0, "k_proj")].shape == (32, 64)

    # 1. Base rows of the merged engine = PEFT's merged model.
    merged_hf = peft_model(model_dir, {"hot": hot_dir}).merge_and_unload()
    _assert_engine_matches(core, BASE, batch, merged_hf)

    # 2. The negated delta, run as an adapter, gives the unmerged base back ...
    core.residency.add("undo", HostAdapter(modules=merged.negated, rank=hot.rank))
    base_hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    _assert_engine_matches(core, "undo", batch, base_hf)
    # ... and CAT-mixed with another adapter, that adapter as PEFT runs it on the unmerged base.
    other = HostAdapter.from_peft_dir(other_dir, core.loaded.spec, 64)
    undo_other = Mix(
        (MixMember("sha256:undo", "tiny", merged.negated), MixMember("sha256:other", "tiny", other.modules)),
        (1.0, 1.0),
        MixMethod.CAT,
    )
    mixed = mix_modules(undo_other)
    core.residency.add("undo+other", HostAdapter(modules=mixed, rank=max(m.rank for m in mixed.values())))
    _assert_engine_matches(core, "undo+other", batch, peft_model(model_dir, {"other": other_dir}))

    # 3. Unmerge restores every parameter bit for bit.
    unmerge_adapter(model, merged)
    _assert_unchanged(model, before)


def test_refuses_a_projection_that_is_not_a_plain_linear(tiny_models: dict[str, Path]) -> None:
    """A quantized projection (any non-``Linear`` block) has no dense weight: refused before anything changes."""
    loaded = load_model(tiny_models["llama"], "float32", torch.device("cpu"), None)
    model = loaded.model

    class QuantizedLinear(nn.Module):  # stands in for another change's quantized block
        def forward(self, x: torch.Tensor, ctx: Any) -> torch.Tensor:
            raise NotImplementedError

    model.layers[1].mlp.down_proj = QuantizedLinear()
    before = _snapshot(model)
    modules: dict[ModuleKey, ModuleLoRA] = {
        (i, m): ModuleLoRA(torch.randn(2, 128 if m == "down_proj" else 64), torch.randn(64, 2), 1.0)
        for i in (0, 1)
        for m in ("o_proj", "down_proj")
    }
    with pytest.raises(FailedPrecondition, match=r"layers\.1\.down_proj is a QuantizedLinear") as err:
        merge_adapter(model, modules)
    assert err.value.reason == "BASE_NOT_DENSE"
    _assert_unchanged(model, before)


def test_refuses_embeddings_of_a_tied_model(tmp_path: Path) -> None:
    model_dir = build_model(tmp_path / "tied", "llama", tie_word_embeddings=True)
    model = load_model(model_dir, "float32", torch.device("cpu"), None).model
    before = _snapshot(model)
    modules: dict[ModuleKey, ModuleLoRA] = {
        (0, "q_proj"): ModuleLoRA(torch.randn(2, 64), torch.randn(64, 2), 1.0),
        (None, "embed_tokens"): ModuleLoRA(torch.randn(2, 320), torch.randn(64, 2), 1.0),
    }
    with pytest.raises(FailedPrecondition, match="tied embeddings") as err:
        merge_adapter(model, modules)
    assert err.value.reason == "TIED_EMBEDDINGS"
    _assert_unchanged(model, before)


def test_dora_factor_keeps_seeing_the_unmerged_base(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """While another adapter is merged, DoRA's norm must come from the saved originals, not the merged W'."""
    model_dir = tiny_models["qwen2"]
    loaded = load_model(model_dir, "float32", torch.device("cpu"), None)
    dora_dir = build_dora_adapter(model_dir, tmp_path / "dora", AdapterSpec(r=4, target_modules=("q_proj", "o_proj")))
    dora, magnitudes = load_dora_adapter(dora_dir, loaded.spec)
    hot = HostAdapter.from_peft_dir(build_adapter(model_dir, tmp_path / "hot", HOT), loaded.spec, 64)
    want = dora_factors(loaded.model, dora.modules, magnitudes)
    merged = merge_adapter(loaded.model, hot.modules)
    stale = dora_factors(loaded.model, dora.modules, magnitudes)
    assert not torch.allclose(stale[(0, "q_proj")], want[(0, "q_proj")], atol=1e-4)
    got = dora_factors(loaded.model, dora.modules, magnitudes, unmerged=merged.originals)
    for key in want:
        assert torch.equal(got[key], want[key]), key
