"""Checkpoint loading: family variants match transformers, malformed folders fail with a clear message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.engine.model.errors import ModelLoadError
from tests.engine.helpers import drive, make_core, prompts, request, tokens
from tests.fixtures.hf import build_model

PROMPT = prompts(1, 12, seed=21)[0]


def _hf_check(model_dir: Path, dtype: str = "float32", atol: float = 1e-4) -> None:
    """Prefill logits and 6 greedy tokens of our engine equal transformers' for the base model."""
    from transformers import AutoModelForCausalLM

    hf: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    hf.eval()
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        want_logits = hf(ids).logits[0, -1]
        out = hf.generate(ids, do_sample=False, max_new_tokens=6, min_new_tokens=6)
    core = make_core(model_dir, dtype=dtype)
    deltas, logits = drive(core, [request("r", PROMPT, None, max_new_tokens=6, ignore_eos=True)], record_logits=True)
    torch.testing.assert_close(logits[0]["r"], want_logits, atol=atol, rtol=0)
    if dtype == "float32":
        assert tokens(deltas["r"]) == out[0, len(PROMPT) :].tolist()


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [
        pytest.param(
            "llama",
            {
                "rope_parameters": {
                    "rope_type": "llama3",
                    "rope_theta": 10000.0,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 32,
                }
            },
            id="llama3-rope",
        ),
        pytest.param(
            "llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}}, id="linear-rope"
        ),
        pytest.param("llama", {"tie_word_embeddings": True, "attention_bias": True}, id="tied-bias"),
        pytest.param("mistral", {"sliding_window": 4}, id="mistral-window"),
        pytest.param(
            "qwen2", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1}, id="qwen2-window"
        ),
    ],
)
def test_variants_match_transformers(tmp_path: Path, arch: str, overrides: dict[str, Any]) -> None:
    _hf_check(build_model(tmp_path / "m", arch=arch, seed=7, **overrides))


def test_sharded_checkpoint_and_bf16(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    src = tiny_models["llama"]
    dst = tmp_path / "sharded"
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for part, chunk in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        file = f"model-{part + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in chunk}, str(dst / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, file))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _hf_check(dst)
    _hf_check(dst, dtype="bfloat16", atol=0.1)
    assert make_core(dst, dtype="bfloat16").loaded.dtype is torch.bfloat16


def _broken_copy(src: Path, dst: Path, edit: Any) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_missing_tensor(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    name = "model.layers.1.mlp.down_proj.weight"
    broken = _broken_copy(tiny_models["llama"], tmp_path / "m", lambda t: t.pop(name))
    with pytest.raises(ModelLoadError, match=f"missing tensor.*{name}"):
        make_core(broken)


def test_wrong_shape(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    name = "model.layers.0.self_attn.k_proj.weight"

    def shrink(t: dict[str, torch.Tensor]) -> None:
        t[name] = t[name][:16]

    broken = _broken_copy(tiny_models["llama"], tmp_path / "m", shrink)
    with pytest.raises(ModelLoadError, match=rf"{name} has shape \[16, 64\], expected \[32, 64\]"):
        make_core(broken)


def test_unknown_architecture_and_missing_files(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    dst = tmp_path / "gpt"
    shutil.copytree(tiny_models["llama"], dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"unsupported architecture.*gpt2"):
        make_core(dst)

    cfg.update(
        model_type="llama", architectures=["LlamaForCausalLM"], rope_parameters={"rope_type": "yarn", "factor": 2.0}
    )
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="unsupported rope type 'yarn'"):
        make_core(dst)

    nothing = tmp_path / "empty"
    nothing.mkdir()
    with pytest.raises(ModelLoadError, match=r"config\.json not found"):
        make_core(nothing)
    no_tok = tmp_path / "notok"
    shutil.copytree(tiny_models["llama"], no_tok)
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json not found"):
        make_core(no_tok)
