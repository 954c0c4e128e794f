# mypy: disable-error-code="untyped-decorator,no-untyped-def"
# (Triton @jit kernels take untyped tensor/constexpr handles; the host-side launchers below are fully typed.)
"""Triton expand: out[T_g, off_i + n] += scale_s · (y[T_g, y_col_i : y_col_i + r] · B_sᵀ), rank-exact.

Grid (M tiles of segments, output tiles of all slices). Output tiles are numbered slice after slice
(cdiv(h_out_i, BLOCK_N) each), so q (4096 wide) and k/v (1024 wide) of a fused qkv share one launch without
idle programs. K = the slot's own rank: the loop runs cdiv(r, BLOCK_K) times and reads r rows of Bᵀ. Each
(token, column) belongs to one program, so the in-place read-modify-write needs no atomics; tokens outside
``token_order`` are never read or written (bit-identical).

Semantics (per slice i, for each segment g):
    s = seg_slot[g];  r = ranks_i[s];  rows = row_table_i[s, :r];  T_g as in shrink
    out[T_g, off_i : off_i + h_out_i] += scales_i[s] * (y[T_g, y_col_i : y_col_i + r] @ b_rows_i[rows])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import triton
import triton.language as tl

from loraplex.kernels.triton_configs import (
    EXPAND_CONFIGS,
    RANK_CLASSES,
    TOKEN_CLASSES,
    bucket,
    prune_expand,
)
from loraplex.kernels.triton_lora_meta import (
    COL_B,
    COL_B_STRIDE,
    COL_H_OUT,
    COL_OUT_OFF,
    COL_RANKS,
    COL_ROWS,
    COL_ROWS_STRIDE,
    COL_SCALES,
    COL_Y_COL,
    META_COLS,
    dot_dtype,
    dot_precision,
    segment_block,
    segment_tile,
    tl_dtype,
)
from loraplex.kernels.types import LoRABatch


@triton.jit
def _expand_kernel(
    y_ptr,  # [T, ·] shrink output (any float dtype)
    out_ptr,  # [T, H], updated in place
    meta_ptr,  # int64 [NUM_SLICES, META_COLS]
    token_order_ptr,
    seg_start_ptr,
    seg_len_ptr,
    seg_slot_ptr,
    num_segments,
    stride_yt,
    stride_ot,
    max_h_out,  # autotune key only: widest slice
    t_class,  # autotune key only
    r_class,  # autotune key only
    NUM_SLICES: tl.constexpr,
    W_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    seg, m0, valid = segment_tile(pid_m, seg_len_ptr, num_segments, BLOCK_M, BLOCK_S)
    if not valid:
        return
    # Which slice owns output tile pid_n (slices' tiles are laid out back to back).
    slice_id = pid_n * 0
    n_tile = pid_n
    tiles_before = pid_n * 0
    for i in tl.static_range(NUM_SLICES):
        tiles_i = tl.cdiv(tl.load(meta_ptr + i * META_COLS + COL_H_OUT), BLOCK_N)
        inside = (pid_n >= tiles_before) & (pid_n < tiles_before + tiles_i)
        slice_id = tl.where(inside, i, slice_id)
        n_tile = tl.where(inside, pid_n - tiles_before, n_tile)
        tiles_before += tiles_i
    meta = meta_ptr + slice_id * META_COLS

    slot = tl.load(seg_slot_ptr + seg).to(tl.int64)
    rank = tl.load(tl.load(meta + COL_RANKS).to(tl.pointer_type(tl.int32)) + slot)
    if rank == 0:  # the adapter does not target this module
        return

    seg_len = tl.load(seg_len_ptr + seg)
    seg_start = tl.load(seg_start_ptr + seg)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < seg_len
    tokens = tl.load(token_order_ptr + seg_start + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_n = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < tl.load(meta + COL_H_OUT)

    rows_base = tl.load(meta + COL_ROWS).to(tl.pointer_type(tl.int32)) + slot * tl.load(meta + COL_ROWS_STRIDE)
    b_ptr = tl.load(meta + COL_B).to(tl.pointer_type(W_DTYPE))
    b_stride = tl.load(meta + COL_B_STRIDE)
    y_rows = y_ptr + tokens[:, None] * stride_yt + tl.load(meta + COL_Y_COL)  # [BLOCK_M, 1]
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, rank, BLOCK_K):
        kk = k + offs_k
        mask_k = kk < rank
        rows = tl.load(rows_base + kk, mask=mask_k, other=0).to(tl.int64)
        yt = tl.load(y_rows + kk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        bt = tl.load(
            b_ptr + rows[:, None] * b_stride + offs_n[None, :],
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        )
        acc = tl.dot(yt.to(DOT_DTYPE), bt.to(DOT_DTYPE), acc, input_precision=PRECISION)

    scale = tl.load(tl.load(meta + COL_SCALES).to(tl.pointer_type(tl.float32)) + slot)
    o_ptrs = out_ptr + tokens[:, None] * stride_ot + tl.load(meta + COL_OUT_OFF) + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    current = tl.load(o_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_ptrs, (current + acc * scale).to(out_ptr.dtype.element_ty), mask=mask)


_expand_tuned = triton.autotune(
    configs=EXPAND_CONFIGS,
    key=["max_h_out", "t_class", "r_class", "NUM_SLICES"],
    prune_configs_by={"early_config_prune": prune_expand},
    restore_value=["out_ptr"],
)(_expand_kernel)


def launch_expand(
    y: torch.Tensor,
    out: torch.Tensor,
    table: torch.Tensor,
    batch: LoRABatch,
    h_outs: Sequence[int],
    max_rank: int,
    w_dtype: torch.dtype,
    config: triton.Config | None = None,
) -> None:
    """Launch the expand for all slices (y: [T, ·], out: [T, H]); ``config`` bypasses autotune."""
    t_lora = int(batch.token_order.shape[0])
    num_segments = int(batch.seg_slot.shape[0])
    if t_lora == 0 or num_segments == 0 or max_rank == 0 or not h_outs:
        return
    widths = tuple(int(h) for h in h_outs)

    def grid(meta: dict[str, Any]) -> tuple[int, int]:
        m_tiles = triton.cdiv(t_lora, meta["BLOCK_M"]) + num_segments
        return (m_tiles, sum(triton.cdiv(h, meta["BLOCK_N"]) for h in widths))

    args = (
        y,
        out,
        table,
        batch.token_order,
        batch.seg_start,
        batch.seg_len,
        batch.seg_slot,
        num_segments,
        y.stride(0),
        out.stride(0),
        max(widths),
        bucket(t_lora, TOKEN_CLASSES),
        bucket(max_rank, RANK_CLASSES),
    )
    consts: dict[str, Any] = {
        "NUM_SLICES": len(widths),
        "W_DTYPE": tl_dtype(w_dtype),
        "DOT_DTYPE": dot_dtype(w_dtype),
        "PRECISION": dot_precision(w_dtype),
        "BLOCK_S": segment_block(num_segments),
    }
    if config is None:
        _expand_tuned[grid](*args, **consts)
    else:
        _expand_kernel[grid](*args, **consts, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
