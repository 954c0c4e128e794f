"""How big the KV cache and the adapter pool are when the operator did not say: sized from what is left.

Why a planner: on a GPU everything is preallocated at start, so the budgets decide how many sequences and how
many adapters fit for the whole life of the process. A quantized base (NF4 holds its projections in ~0.28 of
bf16's bytes) must leave the memory it frees to the KV cache and the adapter pool, not to nobody. On CUDA the
planner reads the device's free memory after the weights are loaded; on CPU (host memory, no such number that
means anything) the fixed defaults below apply.

Budget on CUDA (all figures bytes)::

    usable   = total * gpu_memory_utilization - (total - free)       # what other allocations left us
    usable  -= activation reserve for one step (max_num_batched_tokens rows of the widest layer, the logits)
    adapters = gpu_adapter_bytes if given, else min(DEFAULT_POOL_ADAPTERS adapters of max rank, 10% of usable)
    kv       = kv_cache_bytes if given, else the rest

An explicit ``kv_cache_blocks`` / ``kv_cache_bytes`` / ``gpu_adapter_rows`` / ``gpu_adapter_bytes`` always wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.engine.adapters.pool import bytes_per_row
from loraplex.engine.config import DEFAULT_POOL_ADAPTERS, EngineConfig
from loraplex.engine.kv_cache import blocks_for, bytes_per_block
from loraplex.engine.model.build import LoadedModel
from loraplex.engine.model.errors import ModelLoadError

DEFAULT_KV_TOKENS_PER_SEQ = 2048  # CPU default: this many tokens of KV per sequence of the batch
GPU_MEMORY_UTILIZATION = 0.9  # the share of the device the engine plans to use
ADAPTER_SHARE = 0.1  # at most this share of the usable memory goes to the default adapter pool


@dataclass(frozen=True)
class MemoryPlan:
    kv_blocks: int
    pool_rows: int


def activation_reserve(config: EngineConfig, loaded: LoadedModel) -> int:
    """Bytes one step needs beyond the preallocated buffers (a generous bound: 4 live copies of the widest row
    per batched token, plus float32 logits for every sequence)."""
    args = loaded.args
    element = torch.empty((), dtype=loaded.dtype).element_size()
    widest = max(args.hidden_size, 2 * args.intermediate_size, (args.num_heads + 2 * args.num_kv_heads) * args.head_dim)
    per_token = 4 * widest * element
    logits = config.max_num_seqs * args.vocab_size * 4 * 2
    return config.max_num_batched_tokens * per_token + logits


def plan_memory(
    config: EngineConfig, loaded: LoadedModel, free_bytes: int | None = None, total_bytes: int | None = None
) -> MemoryPlan:
    """Blocks and pool rows for ``config``; ``free_bytes``/``total_bytes`` are the device's (None on CPU)."""
    element = torch.empty((), dtype=loaded.dtype).element_size()
    row_bytes = bytes_per_row(loaded.spec, config.lora_embeddings, element)
    block_bytes = bytes_per_block(loaded.args, config.block_size, loaded.dtype)
    default_rows = config.max_lora_rank * DEFAULT_POOL_ADAPTERS
    usable: int | None = None
    if free_bytes is not None and total_bytes is not None:
        usable = int(total_bytes * GPU_MEMORY_UTILIZATION) - (total_bytes - free_bytes)
        usable -= activation_reserve(config, loaded)
    if config.gpu_adapter_rows is not None:
        rows = config.gpu_adapter_rows
    elif config.gpu_adapter_bytes is not None:
        rows = config.gpu_adapter_bytes // row_bytes
    elif usable is not None:
        rows = max(config.max_lora_rank, min(default_rows, int(usable * ADAPTER_SHARE) // row_bytes))
    else:
        rows = default_rows
    if config.kv_cache_blocks is not None:
        blocks = config.kv_cache_blocks
    elif config.kv_cache_bytes is not None:
        blocks = config.kv_cache_bytes // block_bytes
    elif usable is not None:
        left = usable - rows * row_bytes
        if left < 2 * block_bytes:
            raise ModelLoadError(
                f"no device memory left for the KV cache: {usable} usable bytes after the weights and a step's "
                f"activations, {rows * row_bytes} of them for the adapter pool; lower --max-num-batched-tokens, "
                "quantize the base or use a larger device"
            )
        blocks = left // block_bytes - 1  # the runner allocates one more: its scratch block for padded steps
    else:
        per_seq = min(loaded.max_model_len, DEFAULT_KV_TOKENS_PER_SEQ)
        blocks = config.max_num_seqs * blocks_for(per_seq, config.block_size)
    return MemoryPlan(kv_blocks=blocks, pool_rows=rows)


def plan_for_device(config: EngineConfig, loaded: LoadedModel, device: torch.device) -> MemoryPlan:
    """``plan_memory`` with the device's own free/total bytes on CUDA."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return plan_memory(config, loaded, int(free), int(total))
    return plan_memory(config, loaded)
