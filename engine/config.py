"""Engine configuration: one frozen value object, validated before anything is allocated.

Why frozen: the scheduler, KV cache and adapter pool size their buffers from it once at load; a config that
changed afterwards would silently disagree with what was preallocated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loraplex.registry.errors import InvalidArgument

_DEVICES = ("cpu", "cuda")
_DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_POOL_ADAPTERS = 16  # adapters of max_lora_rank the default device pool holds
_QUANTIZATIONS = ("none", "nf4", "int8")
_LORA_BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs to size itself.

    KV budget: give ``kv_cache_blocks`` or ``kv_cache_bytes`` (not both); with neither, the engine reserves
    enough blocks for ``max_num_seqs`` sequences of ``min(max_model_len, 2048)`` tokens.
    Adapter budget: ``gpu_adapter_rows`` (rank-rows per (layer, module) buffer) or ``gpu_adapter_bytes``
    (all pool buffers together); with neither, the pool holds ``DEFAULT_POOL_ADAPTERS`` adapters of
    ``max_lora_rank`` (more of smaller ranks). Slots (``max_adapters_per_step``) default high so that bytes, not
    slots, bound how many distinct adapters a batch holds.
    """

    model_dir: Path | str
    device: str = "cpu"
    dtype: str = "auto"
    block_size: int = 16
    kv_cache_blocks: int | None = None
    kv_cache_bytes: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    max_adapters_per_step: int = 256
    max_lora_rank: int = 64
    gpu_adapter_rows: int | None = None
    gpu_adapter_bytes: int | None = None
    max_queue: int = 1024
    max_model_len: int | None = None
    lora_embeddings: bool = True
    host_adapter_bytes: int = 2 * 1024**3  # host tier budget (LRU; pinned and busy adapters stay)
    tenant_weights: tuple[tuple[str, float], ...] = ()  # fair-share weight per tenant (others: 1)
    max_wait_s: float = 10.0  # a request waiting longer counts as top priority and holds its adapter's device room
    max_dora_adapters: int = 8  # DoRA adapters the device pool holds at once (one factor row per module each)
    # base projections: "nf4" / "int8" quantize an unquantized checkpoint at load; a checkpoint saved quantized
    # by transformers + bitsandbytes loads as saved with "none" (or its own method)
    quantization: str = "none"
    # LoRA and attention kernels: "auto" = Triton on CUDA, torch elsewhere; "triton" on CPU runs the interpreter.
    lora_backend: str = "auto"
    # Never capture CUDA graphs for decode steps (graphs need the Triton backend on CUDA).
    enforce_eager: bool = False

    def validate(self) -> None:
        """Raise ``InvalidArgument`` naming the first bad field."""
        if self.device not in _DEVICES:
            raise InvalidArgument(f"device must be one of {_DEVICES}, got {self.device!r}")
        if self.dtype not in _DTYPES:
            raise InvalidArgument(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.quantization not in _QUANTIZATIONS:
            raise InvalidArgument(f"quantization must be one of {_QUANTIZATIONS}, got {self.quantization!r}")
        if self.lora_backend not in _LORA_BACKENDS:
            raise InvalidArgument(f"lora_backend must be one of {_LORA_BACKENDS}, got {self.lora_backend!r}")
        positive = {
            "block_size": self.block_size,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "max_adapters_per_step": self.max_adapters_per_step,
            "max_lora_rank": self.max_lora_rank,
            "max_queue": self.max_queue,
            "host_adapter_bytes": self.host_adapter_bytes,
            "max_wait_s": self.max_wait_s,
        }
        for name, value in positive.items():
            if value <= 0:
                raise InvalidArgument(f"{name} must be positive, got {value}")
        optional_positive = {
            "kv_cache_blocks": self.kv_cache_blocks,
            "kv_cache_bytes": self.kv_cache_bytes,
            "gpu_adapter_rows": self.gpu_adapter_rows,
            "gpu_adapter_bytes": self.gpu_adapter_bytes,
            "max_model_len": self.max_model_len,
        }
        for name, maybe in optional_positive.items():
            if maybe is not None and maybe <= 0:
                raise InvalidArgument(f"{name} must be positive when set, got {maybe}")
        if self.kv_cache_blocks is not None and self.kv_cache_bytes is not None:
            raise InvalidArgument("set kv_cache_blocks or kv_cache_bytes, not both")
        if self.gpu_adapter_rows is not None and self.gpu_adapter_bytes is not None:
            raise InvalidArgument("set gpu_adapter_rows or gpu_adapter_bytes, not both")
        if self.gpu_adapter_rows is not None and self.gpu_adapter_rows < self.max_lora_rank:
            raise InvalidArgument(
                f"gpu_adapter_rows ({self.gpu_adapter_rows}) must hold at least one adapter of "
                f"max_lora_rank ({self.max_lora_rank})"
            )
        if self.max_dora_adapters < 0:
            raise InvalidArgument(f"max_dora_adapters must be >= 0, got {self.max_dora_adapters}")
        for tenant, weight in self.tenant_weights:
            if not tenant or not weight > 0 or weight == float("inf"):
                raise InvalidArgument(f"tenant weight of {tenant!r} must be a positive finite number, got {weight}")
        if not str(self.model_dir):
            raise InvalidArgument("model_dir is required")
