"""Triton backend of the LoRA interface: the functions ``kernels.lora`` dispatches to on CUDA.

Signatures and semantics are exactly those of ``kernels.reference`` (the oracle). ``apply_lora`` is the hot
path: one shrink launch for all slices into a zeroed fp32 buffer, then one expand launch for all slices into
the fused output. Every grid size comes from tensor shapes, never from device values, and the only per-call
host work is shape checks and a memoised pointer table, so after one warm-up call (which also autotunes) a
step can be captured in a CUDA graph.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import triton

from loraplex.kernels.triton_lora_expand import launch_expand
from loraplex.kernels.triton_lora_meta import SlicePlan, check_batch, check_weights, meta_table
from loraplex.kernels.triton_lora_shrink import launch_copy_ranks, launch_shrink
from loraplex.kernels.types import LoRABatch, LoRAModuleWeights, LoRASlice


def _check_matrix(name: str, t: torch.Tensor, rows: int | None = None) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} needs a unit stride along its last dimension")
    if rows is not None and t.shape[0] != rows:
        raise ValueError(f"{name} has {t.shape[0]} rows, expected {rows}")


def _plan_slices(slices: Sequence[LoRASlice], h_in: int, out: torch.Tensor) -> list[SlicePlan]:
    """Check every slice and give each its column range in the shared shrink buffer."""
    plans: list[SlicePlan] = []
    spans: list[tuple[int, int]] = []
    y_col = 0
    dtype = slices[0].weights.a_rows.dtype
    for s in slices:
        check_weights(s.weights, h_in, out.device)
        if s.weights.a_rows.dtype != dtype:
            raise TypeError("all slices of one apply_lora call must share a weight dtype")
        h_out = int(s.weights.b_rows.shape[1])
        if s.out_offset < 0 or s.out_offset + h_out > out.shape[1]:
            raise ValueError(f"slice columns [{s.out_offset}, {s.out_offset + h_out}) exceed output {out.shape[1]}")
        spans.append((s.out_offset, s.out_offset + h_out))
        plans.append(SlicePlan(s.weights, s.out_offset, y_col))
        y_col += s.weights.max_rank
    spans.sort()
    for (_, end), (start, _) in itertools.pairwise(spans):
        if start < end:
            raise ValueError("slices must write disjoint output columns")
    return plans


def lora_shrink(
    x: torch.Tensor,
    batch: LoRABatch,
    w: LoRAModuleWeights,
    y: torch.Tensor,
    config: triton.Config | None = None,
) -> None:
    """y[t, :r] = x[t] · Aᵀ per token's adapter (x: [T, h_in], y: [T, R]); other entries of y untouched.

    Split-K needs a zeroed fp32 accumulator, so the kernel writes a private buffer and a copy kernel moves
    exactly each segment's ``[:r]`` columns into ``y``. ``config`` pins a kernel config (tests, benchmarks).
    """
    _check_matrix("x", x)
    _check_matrix("y", y, rows=int(x.shape[0]))
    if y.shape[1] < w.max_rank:
        raise ValueError(f"y has {y.shape[1]} columns, fewer than the pool's max rank {w.max_rank}")
    check_weights(w, int(x.shape[1]), x.device)
    check_batch(batch, x.device)
    if batch.is_empty:
        return
    plan = [SlicePlan(w, 0, 0)]
    buf = torch.zeros((x.shape[0], w.max_rank), dtype=torch.float32, device=x.device)
    launch_shrink(x, buf, meta_table(plan, x.device), batch, w.max_rank, 1, w.a_rows.dtype, config)
    launch_copy_ranks(buf, y, w.ranks, batch, w.max_rank)


def lora_expand(
    y: torch.Tensor,
    batch: LoRABatch,
    w: LoRAModuleWeights,
    out: torch.Tensor,
    out_offset: int = 0,
    config: triton.Config | None = None,
) -> None:
    """out[t, off:off+h_out] += scale · y[t, :r] · Bᵀ, in place (y: [T, R], out: [T, H])."""
    _check_matrix("y", y)
    _check_matrix("out", out, rows=int(y.shape[0]))
    if y.shape[1] < w.max_rank:
        raise ValueError(f"y has {y.shape[1]} columns, fewer than the pool's max rank {w.max_rank}")
    check_weights(w, None, out.device)
    check_batch(batch, out.device)
    if batch.is_empty:
        return
    h_out = int(w.b_rows.shape[1])
    if out_offset < 0 or out_offset + h_out > out.shape[1]:
        raise ValueError(f"columns [{out_offset}, {out_offset + h_out}) exceed output width {out.shape[1]}")
    table = meta_table([SlicePlan(w, out_offset, 0)], out.device)
    launch_expand(y, out, table, batch, [h_out], w.max_rank, w.b_rows.dtype, config)


def apply_lora(
    x: torch.Tensor,
    out: torch.Tensor,
    batch: LoRABatch,
    slices: Sequence[LoRASlice],
    shrink_config: triton.Config | None = None,
    expand_config: triton.Config | None = None,
) -> None:
    """Add every slice's LoRA delta into ``out`` (x: [T, h_in], out: [T, sum h_out]) with two launches."""
    _check_matrix("x", x)
    _check_matrix("out", out, rows=int(x.shape[0]))
    if not slices:
        return
    check_batch(batch, x.device)
    plans = _plan_slices(slices, int(x.shape[1]), out)
    if batch.is_empty:
        return
    dtype = slices[0].weights.a_rows.dtype
    table = meta_table(plans, x.device)
    total_rank = sum(p.weights.max_rank for p in plans)
    max_rank = max(p.weights.max_rank for p in plans)
    y = torch.zeros((x.shape[0], total_rank), dtype=torch.float32, device=x.device)
    launch_shrink(x, y, table, batch, max_rank, len(plans), dtype, shrink_config)
    h_outs = [int(p.weights.b_rows.shape[1]) for p in plans]
    launch_expand(y, out, table, batch, h_outs, max_rank, dtype, expand_config)


def lora_embedding(
    token_ids: torch.Tensor,
    batch: LoRABatch,
    w: LoRAModuleWeights,
    out: torch.Tensor,
    config: triton.Config | None = None,
) -> None:
    """Embedding LoRA (``reference.lora_embedding_ref``): out[t, :h_out] += scale · A[:, id_t] · Bᵀ.

    The shrink is a column gather y[t, j] = a_rows[row_table[slot_t, j], id_t], done with torch ops over the
    per-token slots (``batch.token_slot``), so nothing waits on the host; the expand is the expand kernel, which
    reads only each segment's ``[:r]`` columns of y. Graph-capturable like ``apply_lora``.
    """
    if batch.token_slot is None:
        raise ValueError("lora_embedding needs LoRABatch.token_slot (the per-token slots)")
    _check_matrix("out", out, rows=int(token_ids.shape[0]))
    check_weights(w, None, out.device)
    check_batch(batch, out.device)
    if batch.is_empty:
        return
    if batch.token_slot.shape[0] != token_ids.shape[0]:
        raise ValueError(f"token_slot has {batch.token_slot.shape[0]} entries for {token_ids.shape[0]} tokens")
    rows = w.row_table.index_select(0, batch.token_slot.clamp(min=0)).long()  # [T, R]
    y = w.a_rows[rows, token_ids.long().view(-1, 1)].float()  # [T, R]
    table = meta_table([SlicePlan(w, 0, 0)], out.device)
    launch_expand(y, out, table, batch, [int(w.b_rows.shape[1])], w.max_rank, w.b_rows.dtype, config)
