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
from loraplex.kernels.types import LoRABatch, LoRAModuleWeights, LoRASlice

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


def apply_lora(x: torch.Tensor, out: torch.Tensor, batch: LoRABatch, slices: Sequence[LoRASlice]) -> None:
    """Add every slice's LoRA delta into ``out`` (x: [T, h_in], out: [T, sum(h_out)]), in place.

    Multi-slice lets fused projections (qkv, gate_up) take their LoRA in one call; on CUDA the Triton
    backend launches one shrink and one expand for all slices.
    """
    if batch.is_empty or not slices:
        return
    if _use_triton(x):
        _triton().apply_lora(x, out, batch, slices)
        return
    _apply_lora_torch(x, out, batch, slices)


def _rank_rows(rows: torch.Tensor, table_row: list[int]) -> torch.Tensor:
    """The rank-rows of one slot: a zero-copy slice when they are consecutive (the usual case), else a gather."""
    first = table_row[0]
    if table_row == list(range(first, first + len(table_row))):
        return rows[first : first + len(table_row)]
    return rows[torch.tensor(table_row, dtype=torch.long, device=rows.device)]


def _apply_lora_torch(x: torch.Tensor, out: torch.Tensor, batch: LoRABatch, slices: Sequence[LoRASlice]) -> None:
    """The torch path of ``apply_lora``: same semantics as shrink_ref + expand_ref, fewer ops.

    Why not just call the reference: on CPU the cost is per tensor op, not per flop. Here each segment's tokens
    are gathered once for all slices, ranks/tables are read to the host once per call, rank-rows are sliced
    instead of gathered when consecutive, and each slice's delta lands with one ``index_add_``.
    """
    host = [(s.weights.ranks.tolist(), s.weights.row_table.tolist(), s.weights.scales.tolist()) for s in slices]
    for g in range(batch.num_segments):
        slot, start, length = batch.segment(g)
        if length == 0:
            continue
        tokens = batch.token_order[start : start + length].long()
        xs = x.index_select(0, tokens).float()  # [n, h_in]
        for s, (ranks, table, scales) in zip(slices, host, strict=True):
            r = int(ranks[slot])
            if r == 0:
                continue
            w = s.weights
            a = _rank_rows(w.a_rows, table[slot][:r]).float()  # [r, h_in]
            b = _rank_rows(w.b_rows, table[slot][:r]).float()  # [r, h_out]
            delta = (xs @ a.T) @ b * float(scales[slot])  # [n, h_out]
            h_out = b.shape[1]
            out[:, s.out_offset : s.out_offset + h_out].index_add_(0, tokens, delta.to(out.dtype))


def lora_embedding(token_ids: torch.Tensor, batch: LoRABatch, w: LoRAModuleWeights, out: torch.Tensor) -> None:
    """Add embedding-LoRA deltas into ``out`` ([T, hidden]); see ``reference.lora_embedding_ref``."""
    reference.lora_embedding_ref(token_ids, batch, w, out)
