# mypy: disable-error-code="untyped-decorator,no-untyped-def"
# (Triton @jit kernels take untyped tensor/constexpr handles; the host-side launchers below are fully typed.)
"""Triton shrink: y[T_g, y_col : y_col + r] = x[T_g] · A_sᵀ for every segment g and slice, rank-exact.

Grid (M tiles of segments, slices x rank tiles, SPLIT_K). A program finds its segment from the segment
lengths (``segment_tile``), reads that segment's slot, the slot's rank and physical rank-rows, and multiplies
its token tile by exactly those rows: a rank-8 adapter reads 8 rows of A, never a padded 64. K = h_in is long
and the output is tiny, so K is split across programs that add their fp32 partial sums atomically into a
zeroed fp32 buffer. Nothing in the launch path reads device values, so it can be captured in a CUDA graph.

Semantics (per slice i, for each segment g):
    s = seg_slot[g];  r = ranks_i[s];  rows = row_table_i[s, :r]
    T_g = token_order[seg_start[g] : seg_start[g] + seg_len[g]]
    y[T_g, y_col_i : y_col_i + r] = x[T_g] @ a_rows_i[rows].T      # fp32 accumulate
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from loraplex.kernels.triton_configs import (
    RANK_CLASSES,
    SHRINK_CONFIGS,
    TOKEN_CLASSES,
    bucket,
    prune_shrink,
)
from loraplex.kernels.triton_lora_meta import (
    COL_A,
    COL_A_STRIDE,
    COL_RANKS,
    COL_ROWS,
    COL_ROWS_STRIDE,
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
def _shrink_kernel(
    x_ptr,  # [T, h_in]
    y_ptr,  # fp32 [T, sum of slices' max ranks], zeroed when SPLIT_K > 1
    meta_ptr,  # int64 [num_slices, META_COLS]
    token_order_ptr,
    seg_start_ptr,
    seg_len_ptr,
    seg_slot_ptr,
    num_segments,
    h_in,
    max_rank,
    stride_xt,
    stride_yt,
    t_class,  # autotune key only: bucketed token count
    r_class,  # autotune key only: bucketed max rank
    W_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    k_per_split = tl.cdiv(tl.cdiv(h_in, SPLIT_K), BLOCK_K) * BLOCK_K
    k_begin = pid_k * k_per_split
    if k_begin >= h_in:  # a split with no K chunk left (small h_in) adds nothing
        return
    seg, m0, valid = segment_tile(pid_m, seg_len_ptr, num_segments, BLOCK_M, BLOCK_S)
    if not valid:
        return
    rank_tiles = tl.cdiv(max_rank, BLOCK_N)
    meta = meta_ptr + (pid_n // rank_tiles) * META_COLS
    n0 = (pid_n % rank_tiles) * BLOCK_N
    slot = tl.load(seg_slot_ptr + seg).to(tl.int64)
    rank = tl.load(tl.load(meta + COL_RANKS).to(tl.pointer_type(tl.int32)) + slot)
    if n0 >= rank:  # rank-exact: tiles past this adapter's rank do nothing
        return

    seg_len = tl.load(seg_len_ptr + seg)
    seg_start = tl.load(seg_start_ptr + seg)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < seg_len
    tokens = tl.load(token_order_ptr + seg_start + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < rank
    rows_ptr = tl.load(meta + COL_ROWS).to(tl.pointer_type(tl.int32))
    rows = tl.load(rows_ptr + slot * tl.load(meta + COL_ROWS_STRIDE) + offs_n, mask=mask_n, other=0)
    a_ptr = tl.load(meta + COL_A).to(tl.pointer_type(W_DTYPE))
    a_cols = a_ptr + rows.to(tl.int64)[None, :] * tl.load(meta + COL_A_STRIDE)  # [1, BLOCK_N]
    x_rows = x_ptr + tokens[:, None] * stride_xt  # [BLOCK_M, 1]

    k_end = tl.minimum(k_begin + k_per_split, h_in)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_begin, k_end, BLOCK_K):
        kk = k + offs_k
        mask_k = kk < k_end
        xt = tl.load(x_rows + kk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        at = tl.load(a_cols + kk[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(xt.to(DOT_DTYPE), at.to(DOT_DTYPE), acc, input_precision=PRECISION)

    y_ptrs = y_ptr + tokens[:, None] * stride_yt + tl.load(meta + COL_Y_COL) + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc, mask=mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=mask)


_shrink_tuned = triton.autotune(
    configs=SHRINK_CONFIGS,
    key=["h_in", "t_class", "r_class"],
    prune_configs_by={"early_config_prune": prune_shrink},
    reset_to_zero=["y_ptr"],
)(_shrink_kernel)


@triton.jit
def _copy_ranks_kernel(
    src_ptr,  # fp32 [T, R]
    dst_ptr,  # [T, R] any float dtype
    ranks_ptr,
    token_order_ptr,
    seg_start_ptr,
    seg_len_ptr,
    seg_slot_ptr,
    num_segments,
    stride_st,
    stride_dt,
    BLOCK_S: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dst[T_g, :r] = src[T_g, :r]: ``lora_shrink`` splits K yet leaves every other entry of y untouched."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    seg, m0, valid = segment_tile(pid_m, seg_len_ptr, num_segments, BLOCK_M, BLOCK_S)
    if not valid:
        return
    rank = tl.load(ranks_ptr + tl.load(seg_slot_ptr + seg))
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < tl.load(seg_len_ptr + seg)
    tokens = tl.load(token_order_ptr + tl.load(seg_start_ptr + seg) + offs_m, mask=mask_m, other=0)
    tokens = tokens.to(tl.int64)
    mask = mask_m[:, None] & (offs_n < rank)[None, :]
    vals = tl.load(src_ptr + tokens[:, None] * stride_st + offs_n[None, :], mask=mask, other=0.0)
    dst = dst_ptr + tokens[:, None] * stride_dt + offs_n[None, :]
    tl.store(dst, vals.to(dst_ptr.dtype.element_ty), mask=mask)


def launch_shrink(
    x: torch.Tensor,
    y: torch.Tensor,
    table: torch.Tensor,
    batch: LoRABatch,
    max_rank: int,
    num_slices: int,
    w_dtype: torch.dtype,
    config: triton.Config | None = None,
) -> None:
    """Shrink all slices (x: [T, h_in], y: zeroed fp32 [T, ·]); ``config`` bypasses autotune."""
    t_lora = int(batch.token_order.shape[0])
    num_segments = int(batch.seg_slot.shape[0])
    if t_lora == 0 or num_segments == 0 or max_rank == 0:
        return

    def grid(meta: dict[str, Any]) -> tuple[int, int, int]:
        m_tiles = triton.cdiv(t_lora, meta["BLOCK_M"]) + num_segments
        return (m_tiles, num_slices * triton.cdiv(max_rank, meta["BLOCK_N"]), meta["SPLIT_K"])

    args = (
        x,
        y,
        table,
        batch.token_order,
        batch.seg_start,
        batch.seg_len,
        batch.seg_slot,
        num_segments,
        int(x.shape[1]),
        max_rank,
        x.stride(0),
        y.stride(0),
        bucket(t_lora, TOKEN_CLASSES),
        bucket(max_rank, RANK_CLASSES),
    )
    consts: dict[str, Any] = {
        "W_DTYPE": tl_dtype(w_dtype),
        "DOT_DTYPE": dot_dtype(w_dtype),
        "PRECISION": dot_precision(w_dtype),
        "BLOCK_S": segment_block(num_segments),
    }
    if config is None:
        _shrink_tuned[grid](*args, **consts)
    else:
        _shrink_kernel[grid](*args, **consts, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def launch_copy_ranks(
    src: torch.Tensor, dst: torch.Tensor, ranks: torch.Tensor, batch: LoRABatch, max_rank: int
) -> None:
    """Copy each segment's first r columns of ``src`` into ``dst`` (both [T, R])."""
    t_lora = int(batch.token_order.shape[0])
    num_segments = int(batch.seg_slot.shape[0])
    if t_lora == 0 or num_segments == 0 or max_rank == 0:
        return
    block_m, block_n = 16, min(64, max(16, triton.next_power_of_2(max_rank)))
    grid = (triton.cdiv(t_lora, block_m) + num_segments, triton.cdiv(max_rank, block_n))
    _copy_ranks_kernel[grid](
        src,
        dst,
        ranks,
        batch.token_order,
        batch.seg_start,
        batch.seg_len,
        batch.seg_slot,
        num_segments,
        src.stride(0),
        dst.stride(0),
        BLOCK_S=segment_block(num_segments),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
    )
