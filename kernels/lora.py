"""The one LoRA interface the engine calls; dispatches to Triton on CUDA and to torch elsewhere.

Model code reaches LoRA math in three hops: ``LoRALinear.forward`` → ``apply_lora`` → a kernel. The backend is
chosen per call from the tensor's device, or forced with ``LORAPLEX_LORA_BACKEND=torch|triton`` (or
``set_backend``) for debugging.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from types import ModuleType

import torch

from loraplex.kernels import reference
from loraplex.kernels.torch_lora import LoRAStepCache, apply_lora_torch
from loraplex.kernels.types import LoRABatch, LoRAModuleWeights, LoRASlice

__all__ = ["LoRAStepCache", "apply_lora", "get_backend", "lora_embedding", "lora_expand", "lora_shrink", "set_backend"]

_BACKENDS = ("auto", "torch", "triton")


class _BackendChoice:
    """Holds the forced backend; an object rather than a module global so tests can scope it."""

    def __init__(self) -> None:
        self.value = os.environ.get("LORAPLEX_LORA_BACKEND", "auto")


_choice = _BackendChoice()


def set_backend(name: str) -> None:
    if name not in _BACKENDS:
        raise ValueError(f"LoRA backend must be one of {_BACKENDS}, got {name!r}")
    _choice.value = name


def get_backend() -> str:
    return _choice.value


def _triton() -> ModuleType:
    from loraplex.kernels import triton_lora

    return triton_lora


def _use_triton(x: torch.Tensor) -> bool:
    if _choice.value == "triton":
        return True
    if _choice.value == "torch":
        return False
    return x.is_cuda


def lora_shrink(x: torch.Tensor, batch: LoRABatch, w: LoRAModuleWeights, y: torch.Tensor) -> None:
    """y[t, :r] = x[t] · Aᵀ per token's adapter (x: [T, h_in], y: [T, R])."""
    if _use_triton(x):
        _triton().lora_shrink(x, batch, w, y)
    else:
        reference.lora_shrink_ref(x, batch, w, y)


def lora_expand(
    y: torch.Tensor, batch: LoRABatch, w: LoRAModuleWeights, out: torch.Tensor, out_offset: int = 0
) -> None:
    """out[t, off:off+h_out] += scale · y[t, :r] · Bᵀ, in place (y: [T, R], out: [T, H])."""
    if _use_triton(y):
        _triton().lora_expand(y, batch, w, out, out_offset)
    else:
        reference.lora_expand_ref(y, batch, w, out, out_offset)


def apply_lora(
    x: torch.Tensor,
    out: torch.Tensor,
    batch: LoRABatch,
    slices: Sequence[LoRASlice],
    cache: LoRAStepCache | None = None,
) -> None:
    """Add every slice's LoRA delta into ``out`` (x: [T, h_in], out: [T, sum(h_out)]), in place.

    Multi-slice lets fused projections (qkv, gate_up) take their LoRA in one call; on CUDA the Triton
    backend launches one shrink and one expand for all slices. ``cache`` (one per engine) lets the torch path
    reuse a step's segment layout across layers and its padded weights across steps; Triton ignores it.
    """
    if batch.is_empty or not slices:
        return
    if _use_triton(x):
        _triton().apply_lora(x, out, batch, slices)
        return
    apply_lora_torch(x, out, batch, slices, cache)


def lora_embedding(token_ids: torch.Tensor, batch: LoRABatch, w: LoRAModuleWeights, out: torch.Tensor) -> None:
    """Add embedding-LoRA deltas into ``out`` ([T, hidden]); see ``reference.lora_embedding_ref``."""
    reference.lora_embedding_ref(token_ids, batch, w, out)
