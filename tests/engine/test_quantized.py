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
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.engine.adapters.host import HostAdapter
from loraplex.engine.config import EngineConfig
from loraplex.engine.core import EngineCore
from loraplex.engine.model.build import LoadedModel, load_model
from loraplex.engine.model.errors import ModelLoadError
from loraplex.engine.model.quant_int8 import dequantize_int8, quantize_int8
from loraplex.engine.model.quant_linear import NF4Part, QuantizedLinear
from loraplex.engine.model.quant_nf4 import block_scales, dynamic_map, nf4_code, quantize_nf4
from loraplex.registry.errors import InvalidArgument
from tests.engine.helpers import (
    BASE,
    assert_mixed_batch_matches,
    drive,
    per_row_oracle,
    prompts,
    request,
    tokens,
)

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
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    cfg = bnb_config(method)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=cfg, dtype=torch.float32)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def oracle(model_dir: Path, adapters: Mapping[str, Path], method: str) -> Any:
    bnb = pytest.importorskip("bitsandbytes")
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
    core = EngineCore(config, loaded)
    for name, path in adapters.items():
        core.residency.add(name, HostAdapter.from_peft_dir(path, core.loaded.spec, 64))
    return core


def compare_mixed_batch(model_dir: Path, adapters: Mapping[str, Path], method: str, core: EngineCore) -> None:
    """Greedy tokens equal and fp32 logits within 1e-4 of PEFT on bitsandbytes, for every row and step."""
    names = [*adapters, BASE, BASE]
    batch = prompts(len(names), PROMPT_LEN, seed=5)
    assert_mixed_batch_matches(core, oracle(model_dir, adapters, method), batch, names, NEW_TOKENS, EOS)


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


# -- the formats, byte for byte against bitsandbytes ----------------------------------------------------------


def test_code_tables_equal_bitsandbytes() -> None:
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(nf4_code(), bnb_functional.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_map(), bnb_functional.create_dynamic_map())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(64, 64), (32, 64), (96, 4096), (700, 300), (3, 22)])
def test_nf4_quantize_and_dequantize_are_bit_equal_to_bitsandbytes(shape: tuple[int, int], dtype: torch.dtype) -> None:
    """Packed codes, uint8 scales, nested scales and offset equal; so does the dequantized weight."""
    functional = pytest.importorskip("bitsandbytes.functional")
    g = torch.Generator().manual_seed(shape[0] * 7 + shape[1])
    weight = (torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g)).to(dtype)
    weight[0, :5] = 0
    weight[-1] = 0  # an all-zero block
    packed, state = functional.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    ours = quantize_nf4(weight)
    assert torch.equal(ours.packed, packed.view(-1))
    assert torch.equal(ours.absmax, state.absmax)
    assert ours.absmax2 is not None and torch.equal(ours.absmax2, state.state2.absmax)
    assert ours.offset is not None and torch.equal(ours.offset, state.offset)
    assert torch.equal(NF4Part(ours).dequantize(dtype), functional.dequantize_4bit(packed, state))
    assert torch.equal(
        block_scales(ours.absmax, ours.absmax2, ours.offset, ours.code2, 256),
        functional.dequantize_blockwise(state.absmax, state.state2) + state.offset,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_quantize_and_dequantize_are_bit_equal_to_bitsandbytes(dtype: torch.dtype) -> None:
    functional = pytest.importorskip("bitsandbytes.functional")
    weight = (torch.randn(300, 200, generator=torch.Generator().manual_seed(3)) * 0.1).to(dtype)
    weight[5] = 0
    cb, scb, _ = functional.int8_vectorwise_quant(weight.to(torch.float16))
    ours = quantize_int8(weight)
    assert torch.equal(ours.cb, cb) and torch.equal(ours.scb, scb)
    # bitsandbytes' MatMul8bitFp weight: CB.to(dtype).mul_(SCB / 127) in place
    want = cb.to(dtype).mul_(scb.unsqueeze(1).mul(1.0 / 127.0))
    assert torch.equal(dequantize_int8(ours.cb, ours.scb, dtype), want)


# -- checkpoints saved quantized by transformers ---------------------------------------------------------------


def save_quantized(model_dir: Path, out_dir: Path, method: str) -> Path:
    """What a user gets from ``save_pretrained`` on a bitsandbytes-quantized model, plus the tokenizer files."""
    if not out_dir.exists():
        bnb_model(model_dir, method).save_pretrained(str(out_dir))
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
            if (model_dir / name).is_file():
                shutil.copy(model_dir / name, out_dir / name)
    return out_dir


def quantized_state(loaded: LoadedModel) -> dict[str, torch.Tensor]:
    return {k: v for k, v in loaded.model.state_dict().items() if ".parts." in k}


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_saved_checkpoint_loads_without_a_flag_and_equals_quantize_at_load(
    method: str, hf_root: Path, tiny_models: dict[str, Path]
) -> None:
    saved = save_quantized(tiny_models["qwen2"], hf_root / f"saved-qwen2-{method}", method)
    config = json.loads((saved / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    cpu = torch.device("cpu")
    from_saved = load_model(saved, "float32", cpu, None)  # no flag: the checkpoint says how it is stored
    at_load = load_model(tiny_models["qwen2"], "float32", cpu, None, method)
    assert from_saved.quantization == at_load.quantization == method
    ours, theirs = quantized_state(at_load), quantized_state(from_saved)
    assert ours.keys() == theirs.keys() and len(ours) >= 2 * 7
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key
    assert from_saved.weight_bytes == at_load.weight_bytes
    # the whole forward agrees bit for bit (the same code runs on the same bytes)
    prompt = prompts(1, 6, seed=2)[0]
    outputs = []
    for loaded in (from_saved, at_load):
        config_ = EngineConfig(model_dir=saved, dtype="float32", block_size=4, kv_cache_blocks=64)
        core = EngineCore(config_, loaded)
        req = request("r", prompt, None, max_new_tokens=4, ignore_eos=True)
        deltas, logits = drive(core, [req], record_logits=True)
        outputs.append((tokens(deltas["r"]), torch.stack([step["r"] for step in logits])))
    assert outputs[0][0] == outputs[1][0]
    assert torch.equal(outputs[0][1], outputs[1][1])


def test_saved_checkpoint_through_engine_load_and_conflicting_flag(hf_root: Path, tiny_models: dict[str, Path]) -> None:
    saved = save_quantized(tiny_models["qwen2"], hf_root / "saved-qwen2-nf4", "nf4")
    core = EngineCore.load(EngineConfig(model_dir=saved, dtype="float32", block_size=4, kv_cache_blocks=64))
    assert core.loaded.quantization == "nf4"
    with pytest.raises(ModelLoadError, match=r"already quantized \(bitsandbytes nf4\).*int8"):
        load_model(saved, "float32", torch.device("cpu"), None, "int8")


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(model_dir: Path, **changes: Any) -> None:
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    ("quantization_config", "named"),
    [
        ({"quant_method": "gptq", "bits": 4}, "'gptq'"),
        ({"quant_method": "awq"}, "'awq'"),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}, "'fp4'"),
        ({"quant_method": "bitsandbytes"}, "neither load_in_4bit nor load_in_8bit"),
    ],
)
def test_unsupported_quantization_in_checkpoint_is_a_clear_startup_error(
    quantization_config: dict[str, Any], named: str, tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    model_dir = _copy_model(tiny_models["llama"], tmp_path / "m")
    _edit_config(model_dir, quantization_config=quantization_config)
    with pytest.raises(ModelLoadError, match=named) as info:
        EngineCore.load(EngineConfig(model_dir=model_dir, dtype="float32", block_size=4, kv_cache_blocks=64))
    assert "config.json" in info.value.message


def test_damaged_quantized_tensor_is_named(hf_root: Path, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    saved = _copy_model(save_quantized(tiny_models["qwen2"], hf_root / "saved-qwen2-nf4", "nf4"), tmp_path / "m")
    tensors = load_file(str(saved / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight.absmax"
    tensors[name] = tensors[name][:-1].clone()
    save_file(tensors, str(saved / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=name.replace(".", r"\.")):
        load_model(saved, "float32", torch.device("cpu"), None)


def test_engine_config_rejects_unknown_quantization(tiny_models: dict[str, Path]) -> None:
    with pytest.raises(InvalidArgument, match="quantization"):
        EngineConfig(model_dir=tiny_models["llama"], quantization="fp8").validate()


# -- memory -----------------------------------------------------------------------------------------------------


def test_weight_bytes_shrink_by_the_packed_projections(tiny_models: dict[str, Path]) -> None:
    """NF4+DQ projections take 4.127 bits per weight (+ two small code tables per part); the rest is unchanged."""
    cpu = torch.device("cpu")
    dense = load_model(tiny_models["llama"], "bfloat16", cpu, None)
    nf4 = load_model(tiny_models["llama"], "bfloat16", cpu, None, "nf4")
    int8 = load_model(tiny_models["llama"], "bfloat16", cpu, None, "int8")
    args = dense.args
    per_layer = (args.num_heads + 2 * args.num_kv_heads) * args.head_dim * args.hidden_size
    per_layer += args.num_heads * args.head_dim * args.hidden_size + 3 * args.intermediate_size * args.hidden_size
    projection_params = per_layer * args.num_layers
    parts = 7 * args.num_layers
    # per part: packed N*K/2 + u8 scale per 64 + fp32 nested scale per 16384 (here one) + offset + 16 + 256 codes
    nf4_projection_bytes = projection_params // 2 + projection_params // 64 + parts * (4 + 4 + 16 * 4 + 256 * 4)
    assert dense.weight_bytes - nf4.weight_bytes == 2 * projection_params - nf4_projection_bytes
    # int8: one byte per weight plus one fp32 scale per output row
    rows = (args.num_heads + 2 * args.num_kv_heads) * args.head_dim + args.hidden_size  # q|k|v, o
    rows = args.num_layers * (rows + 2 * args.intermediate_size + args.hidden_size)  # + gate|up, down
    assert dense.weight_bytes - int8.weight_bytes == 2 * projection_params - (projection_params + 4 * rows)


def test_checkpoint_with_a_skipped_module_fuses_dense_and_packed_parts(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """``llm_int8_skip_modules=["k_proj"]`` leaves k dense between packed q and v: the fused qkv mixes both."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from loraplex.engine.model.quant_linear import DensePart

    cfg = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=["lm_head", "k_proj"],
    )
    source = tiny_models["llama"]
    hf: Any = AutoModelForCausalLM.from_pretrained(str(source), quantization_config=cfg, dtype=torch.float32)
    hf.save_pretrained(str(tmp_path / "m"))
    shutil.copy(source / "tokenizer.json", tmp_path / "m" / "tokenizer.json")
    for module in hf.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    loaded = load_model(tmp_path / "m", "float32", torch.device("cpu"), None)
    qkv = loaded.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, QuantizedLinear)
    assert [type(p).__name__ for p in qkv.parts] == ["NF4Part", "DensePart", "NF4Part"]
    assert isinstance(qkv.parts[1], DensePart)
    prompt = prompts(1, 8, seed=4)[0]
    with torch.no_grad():
        want = hf.eval()(torch.tensor([prompt])).logits[0, -1]
    core = EngineCore(EngineConfig(model_dir=tmp_path / "m", dtype="float32", block_size=4), loaded)
    _, logits = drive(core, [request("r", prompt, None, max_new_tokens=1)], record_logits=True)
    torch.testing.assert_close(logits[0]["r"], want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ORACLE_ARCHS)
def test_nf4_dora_with_lora_and_base_rows_matches_peft(
    arch: str, tiny_models: dict[str, Path], tiny_adapters: dict[str, dict[str, Path]], tmp_path: Path
) -> None:
    """A DoRA adapter on the NF4 base: its factor comes from the dequantized weight, as PEFT's does on bitsandbytes.

    PEFT runs DoRA only one adapter at a time (no ``adapter_names``), so the oracle generates row by row; the engine
    runs the DoRA rows, a LoRA row and base rows in one batch.
    """
    from loraplex.services.demo_assets import ALL_LINEAR, AdapterSpec
    from tests.fixtures.peft_variants import build_dora_adapter

    model_dir = tiny_models[arch]
    spec = AdapterSpec(r=8, lora_alpha=16, target_modules=tuple(ALL_LINEAR), seed=3)
    adapters = {"dora": build_dora_adapter(model_dir, tmp_path / "dora", spec, magnitude_seed=1)}
    adapters["lora"] = tiny_adapters[arch]["qv-r4"]
    names = ["dora", "lora", BASE, "dora"]
    batch = prompts(len(names), PROMPT_LEN, seed=9)
    model = oracle(model_dir, adapters, "nf4")
    want = per_row_oracle(model, list(zip(names, batch, strict=True)), NEW_TOKENS, EOS)
    core = quant_core(model_dir, adapters, "nf4")
    reqs = [
        request(f"r{i}", p, n, max_new_tokens=NEW_TOKENS) for i, (n, p) in enumerate(zip(names, batch, strict=True))
    ]
    deltas, logits = drive(core, reqs, record_logits=True)
    for i, name in enumerate(names):
        assert tokens(deltas[f"r{i}"]) == want[i][0], f"row {i} ({name})"
        for k, expected in enumerate(want[i][1]):
            got = logits[k].get(f"r{i}") if k < len(logits) else None
            if got is None:
                break
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=0, msg=f"row {i} ({name}) step {k}")
