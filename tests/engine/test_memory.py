"""Default device budgets: the KV cache and the adapter pool get what the weights and a step leave."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraplex.engine.adapters.pool import bytes_per_row
from loraplex.engine.config import EngineConfig
from loraplex.engine.kv_cache import bytes_per_block
from loraplex.engine.memory import activation_reserve, plan_memory
from loraplex.engine.model.build import LoadedModel, load_model
from loraplex.engine.model.errors import ModelLoadError

MIB = 1024**2


def _loaded(model_dir: Path, quantization: str = "none") -> LoadedModel:
    return load_model(model_dir, "float32", torch.device("cpu"), None, quantization)


def test_explicit_budgets_win_and_cpu_keeps_its_defaults(tiny_models: dict[str, Path]) -> None:
    loaded = _loaded(tiny_models["llama"])
    config = EngineConfig(model_dir=tiny_models["llama"], kv_cache_blocks=77, gpu_adapter_rows=640)
    assert plan_memory(config, loaded, free_bytes=10**12, total_bytes=10**12) == plan_memory(config, loaded)
    plan = plan_memory(EngineConfig(model_dir=tiny_models["llama"], max_num_seqs=4, block_size=16), loaded)
    assert plan.kv_blocks == 4 * -(-min(loaded.max_model_len, 2048) // 16) and plan.pool_rows == 64 * 16


def test_a_quantized_base_leaves_its_savings_to_the_kv_cache(tiny_models: dict[str, Path]) -> None:
    """Same device, same settings: the NF4 base's freed bytes become KV blocks (the adapter pool is capped)."""
    config = EngineConfig(model_dir=tiny_models["llama"], block_size=4, max_num_seqs=4, max_num_batched_tokens=64)
    dense, nf4 = _loaded(tiny_models["llama"]), _loaded(tiny_models["llama"], "nf4")
    assert nf4.weight_bytes < dense.weight_bytes
    total = 64 * MIB
    plans = {
        name: plan_memory(config, loaded, free_bytes=total - loaded.weight_bytes, total_bytes=total)
        for name, loaded in (("dense", dense), ("nf4", nf4))
    }
    saved = dense.weight_bytes - nf4.weight_bytes
    block = bytes_per_block(dense.args, 4, dense.dtype)
    row = bytes_per_row(dense.spec, True, 4)
    extra_kv = (plans["nf4"].kv_blocks - plans["dense"].kv_blocks) * block
    extra_pool = (plans["nf4"].pool_rows - plans["dense"].pool_rows) * row
    assert extra_kv > 0.8 * saved and abs(extra_kv + extra_pool - saved) <= block + row
    usable = int(total * 0.9) - dense.weight_bytes - activation_reserve(config, dense)
    assert plans["dense"].kv_blocks * block <= usable


def test_too_little_device_memory_is_a_clear_start_error(tiny_models: dict[str, Path]) -> None:
    loaded = _loaded(tiny_models["llama"])
    config = EngineConfig(model_dir=tiny_models["llama"])
    with pytest.raises(ModelLoadError, match="no device memory left for the KV cache"):
        plan_memory(config, loaded, free_bytes=MIB, total_bytes=loaded.weight_bytes + MIB)
