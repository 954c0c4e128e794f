"""Quantized bases (NF4 with double quantization, int8) against transformers + bitsandbytes + PEFT.

The oracle is transformers with ``BitsAndBytesConfig`` on CPU, i.e. bitsandbytes' own quantizer and matmul, with
the PEFT test-zoo adapters on top. Our engine quantizes the same fp32 checkpoint at load with its own torch code,
so equal outputs mean equal quantized bytes *and* equal serving math:

* NF4 + double quantization: bitsandbytes dequantizes to fp32 and runs ``F.linear``; we decode the same fp32
  weight. Tolerance: the repo's fp32 oracle bound, 1e-4 on logits, greedy tokens equal.
* int8: the documented reference is bitsandbytes' weight-only ``MatMul8bitFp`` (dequantize, then ``F.linear``),
  which ``Linear8bitLt`` runs in training mode on CPU; only the oracle's ``Linear8bitLt`` modules are put in
  training mode to take that path (they hold no dropout). Same tolerance.

bitsandbytes' CPU 4-bit path on AVX512-BF16 machines repacks weights and multiplies in bf16; the oracle turns that
off so it computes in fp32 on every CPU.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loraplex.engine.adapters.host import HostAdapter
from loraplex.engine.adapters.host_cache import HostTier
from loraplex.engine.config import EngineConfig
from loraplex.engine.core import EngineCore
from loraplex.engine.model.build import load_model
from loraplex.engine.model.errors import ModelLoadError
from loraplex.engine.model.quant_int8 import quantize_int8
from loraplex.engine.model.quant_linear import QuantizedLinear
from loraplex.engine.model.quant_nf4 import dynamic_map, nf4_code, quantize_nf4
from tests.engine.helpers import BASE, drive, prompts, request, tokens, until_eos

bnb = pytest.importorskip("bitsandbytes")

NEW_TOKENS = 6
PROMPT_LEN = 7
EOS = 1
ORACLE_ARCHS = ("llama", "qwen2")
# A mixed batch: six zoo adapters of different ranks/targets (incl. embeddings + lm_head) and base rows.
MIX = ("qv-r4", "all-r8", "attn-r16-rs", "mlp-r32", "pattern-r8", "embed-head-r8")


def bnb_config(method: str) -> Any:
    from transformers import BitsAndBytesConfig

    if method == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def bnb_model(model_dir: Path, method: str) -> Any:
    """transformers quantizing the checkpoint with bitsandbytes, pinned to its fp32 / weight-only reference path."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=bnb_config(method), dtype=torch.float32)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def oracle(model_dir: Path, adapters: Mapping[str, Path], method: str) -> Any:
    from peft import PeftModel

    names = list(adapters)
    model = PeftModel.from_pretrained(bnb_model(model_dir, method), str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    model.eval()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear8bitLt):
            module.train()  # its weight-only dequantize-then-matmul path (MatMul8bitFp); nothing else changes
    return model


def quant_core(model_dir: Path, adapters: Mapping[str, Path], quantization: str) -> EngineCore:
    """A CPU fp32 core on a quantized base (built from ``load_model`` so the test does not depend on core.py)."""
    config = EngineConfig(
        model_dir=model_dir,
        dtype="float32",
        block_size=4,
        kv_cache_blocks=256,
        max_adapters_per_step=8,
        max_lora_rank=64,
        quantization=quantization,
    )
    loaded = load_model(model_dir, "float32", torch.device("cpu"), None, quantization)
    core = EngineCore(config, loaded, HostTier())
    for name, path in adapters.items():
        core.host.add(name, HostAdapter.from_peft_dir(path, core.loaded.spec, 64))
    return core


def compare_mixed_batch(model_dir: Path, adapters: Mapping[str, Path], method: str, core: EngineCore) -> None:
    """Greedy tokens equal and fp32 logits within 1e-4 of PEFT on bitsandbytes, for every row and step."""
    names = [*adapters, BASE, BASE]
    batch = prompts(len(names), PROMPT_LEN, seed=5)
    model = oracle(model_dir, adapters, method)
    input_ids = torch.tensor(batch)
    with torch.no_grad():
        prefill = model(input_ids, adapter_names=names).logits[:, -1].float()
        out = model.generate(
            input_ids,
            adapter_names=names,
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            output_logits=True,
            return_dict_in_generate=True,
        )
    want = [until_eos(row[PROMPT_LEN:].tolist(), EOS) for row in out.sequences]
    reqs = [request(f"r{i}", p, n, max_new_tokens=NEW_TOKENS) for i, (p, n) in enumerate(zip(batch, names, strict=True))]
    deltas, logits = drive(core, reqs, record_logits=True)
    for i, name in enumerate(names):
        assert tokens(deltas[f"r{i}"]) == want[i], f"row {i} adapter {name}"
        torch.testing.assert_close(logits[0][f"r{i}"], prefill[i], atol=1e-4, rtol=0)
    compared = 0
    for k in range(1, NEW_TOKENS):
        for i in range(len(names)):
            row = logits[k].get(f"r{i}") if k < len(logits) else None
            if row is not None:
                torch.testing.assert_close(row, out.logits[k][i].float(), atol=1e-4, rtol=0)
                compared += 1
    assert compared >= len(names) * 2


@pytest.mark.parametrize("arch", ORACLE_ARCHS)
def test_nf4_mixed_batch_matches_peft_on_bitsandbytes(
    arch: str, tiny_models: dict[str, Path], tiny_adapters: dict[str, dict[str, Path]]
) -> None:
    adapters = {name: tiny_adapters[arch][name] for name in MIX}
    core = quant_core(tiny_models[arch], adapters, "nf4")
    assert core.loaded.quantization == "nf4"
    assert any(isinstance(m, QuantizedLinear) for m in core.loaded.model.modules())
    compare_mixed_batch(tiny_models[arch], adapters, "nf4", core)


@pytest.mark.parametrize("arch", ORACLE_ARCHS)
def test_int8_mixed_batch_matches_bitsandbytes_weight_only_reference(
    arch: str, tiny_models: dict[str, Path], tiny_adapters: dict[str, dict[str, Path]]
) -> None:
    adapters = {name: tiny_adapters[arch][name] for name in MIX[:3]}
    core = quant_core(tiny_models[arch], adapters, "int8")
    assert core.loaded.quantization == "int8"
    compare_mixed_batch(tiny_models[arch], adapters, "int8", core)
