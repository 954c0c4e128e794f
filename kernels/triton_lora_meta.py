# mypy: disable-error-code="untyped-decorator,no-untyped-def"
# (Triton @jit kernels take untyped tensor/constexpr handles; the host-side launchers below are fully typed.)
"""Per-call derived data for the LoRA kernels: the slice pointer table, input checks and tile lookup.

Why a pointer table: ``apply_lora`` must add q/k/v (or gate/up) deltas with ONE shrink and ONE expand launch,
yet each slice has its own pool tensors (``a_rows``, ``b_rows``, ``row_table``, ``ranks``, ``scales``). The
kernels therefore read, per slice, an int64 row of addresses, strides and offsets. The row is a pure function
of those addresses/strides/offsets, so it is memoised on exactly that tuple: a cache hit is always correct
(even if a tensor was freed and another one took its address), and after one warm-up call the launch path
does no host-to-device copy, which keeps it CUDA-graph capturable.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from loraplex.kernels.triton_configs import interpreting
from loraplex.kernels.types import LoRABatch, LoRAModuleWeights

# Columns of one slice's row in the meta table (int64).
COL_A = tl.constexpr(0)  # address of a_rows [P, h_in]
COL_B = tl.constexpr(1)  # address of b_rows [P, h_out]
COL_ROWS = tl.constexpr(2)  # address of row_table int32 [slots, R]
COL_RANKS = tl.constexpr(3)  # address of ranks int32 [slots]
COL_SCALES = tl.constexpr(4)  # address of scales float32 [slots]
COL_A_STRIDE = tl.constexpr(5)  # a_rows.stride(0)
COL_B_STRIDE = tl.constexpr(6)  # b_rows.stride(0)
COL_ROWS_STRIDE = tl.constexpr(7)  # row_table.stride(0)
COL_H_OUT = tl.constexpr(8)  # b_rows.shape[1]
COL_OUT_OFF = tl.constexpr(9)  # first output column of the slice
COL_Y_COL = tl.constexpr(10)  # first column of the slice's ranks in the shrink buffer y
META_COLS = tl.constexpr(11)

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def tl_dtype(dtype: torch.dtype) -> tl.dtype:
    """The Triton element type for a supported torch float dtype (explicit error otherwise)."""
    if dtype not in _TL_DTYPES:
        raise TypeError(f"LoRA/attention kernels support float16, bfloat16 and float32, got {dtype}")
    return _TL_DTYPES[dtype]


def dot_dtype(dtype: torch.dtype) -> tl.dtype:
    """The operand type of ``tl.dot`` for weights of ``dtype``.

    Halves feed tensor cores directly. The CPU interpreter (Triton 3.9) multiplies bfloat16 as raw uint16 bit
    patterns, so when interpreting bf16 operands are widened to fp32 first; bf16 products are exact in fp32,
    so results are unchanged.
    """
    if dtype == torch.bfloat16 and interpreting():
        return tl.float32
    return tl_dtype(dtype)


def dot_precision(dtype: torch.dtype) -> str | None:
    """fp32 operands use IEEE products (tf32 would miss the reference by ~1e-3); halves take the default."""
    return "ieee" if dot_dtype(dtype) == tl.float32 else None


@dataclass(frozen=True)
class SlicePlan:
    """Where one module's LoRA reads its ranks in y and writes its columns in the output."""

    weights: LoRAModuleWeights
    out_offset: int
    y_col: int


def check_weights(w: LoRAModuleWeights, h_in: int | None, device: torch.device) -> None:
    """Validate one module's pool views: the kernels index rows by address, so layouts must be exact."""
    if w.a_rows.dim() != 2 or w.b_rows.dim() != 2:
        raise ValueError("a_rows and b_rows must be 2-D [P, h]")
    if w.a_rows.shape[0] != w.b_rows.shape[0]:
        raise ValueError(f"a_rows has {w.a_rows.shape[0]} rows but b_rows has {w.b_rows.shape[0]}")
    if h_in is not None and w.a_rows.shape[1] != h_in:
        raise ValueError(f"a_rows width {w.a_rows.shape[1]} != input width {h_in}")
    if w.a_rows.stride(1) != 1 or w.b_rows.stride(1) != 1:
        raise ValueError("a_rows and b_rows need a unit stride along their last dimension")
    if w.a_rows.dtype != w.b_rows.dtype:
        raise TypeError(f"a_rows {w.a_rows.dtype} and b_rows {w.b_rows.dtype} must share a dtype")
    tl_dtype(w.a_rows.dtype)
    if w.row_table.dim() != 2 or w.row_table.dtype != torch.int32 or w.row_table.stride(1) != 1:
        raise ValueError("row_table must be int32 [slots, R] with a unit last stride")
    if w.ranks.dtype != torch.int32 or w.ranks.dim() != 1 or w.ranks.stride(0) != 1:
        raise ValueError("ranks must be a contiguous int32 [slots] tensor")
    if w.scales.dtype != torch.float32 or w.scales.dim() != 1 or w.scales.stride(0) != 1:
        raise ValueError("scales must be a contiguous float32 [slots] tensor")
    for name, t in (
        ("a_rows", w.a_rows),
        ("b_rows", w.b_rows),
        ("row_table", w.row_table),
        ("ranks", w.ranks),
        ("scales", w.scales),
    ):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, expected {device}")


def check_batch(batch: LoRABatch, device: torch.device) -> None:
    """Segment tensors must be int32 on the compute device; the kernels read them, never the host copy."""
    for name, t in (
        ("token_order", batch.token_order),
        ("seg_start", batch.seg_start),
        ("seg_len", batch.seg_len),
        ("seg_slot", batch.seg_slot),
    ):
        if t.dtype != torch.int32 or t.dim() != 1 or t.stride(0) != 1:
            raise ValueError(f"LoRABatch.{name} must be a contiguous int32 vector")
        if t.device != device:
            raise ValueError(f"LoRABatch.{name} is on {t.device}, expected {device}")
    num = batch.seg_slot.shape[0]
    if batch.seg_start.shape[0] != num or batch.seg_len.shape[0] != num:
        raise ValueError("seg_start, seg_len and seg_slot must have the same length")


def _row(plan: SlicePlan) -> tuple[int, ...]:
    w = plan.weights
    return (
        w.a_rows.data_ptr(),
        w.b_rows.data_ptr(),
        w.row_table.data_ptr(),
        w.ranks.data_ptr(),
        w.scales.data_ptr(),
        w.a_rows.stride(0),
        w.b_rows.stride(0),
        w.row_table.stride(0),
        w.b_rows.shape[1],
        plan.out_offset,
        plan.y_col,
    )


@functools.lru_cache(maxsize=1024)
def _table(rows: tuple[tuple[int, ...], ...], device: torch.device) -> torch.Tensor:
    """Memoised: the table depends only on ``rows``; see the module docstring for why that is safe."""
    return torch.tensor(rows, dtype=torch.int64, device=device).contiguous()


def meta_table(plans: Sequence[SlicePlan], device: torch.device) -> torch.Tensor:
    """int64 [num_slices, META_COLS] (read-only: it is shared between calls with the same key)."""
    return _table(tuple(_row(p) for p in plans), device)


@triton.jit
def segment_tile(pid_m, seg_len_ptr, num_segments, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr):
    """Map a program's M index to (segment, first position in it, valid).

    Tiles never straddle segments: segment g owns cdiv(seg_len[g], BLOCK_M) consecutive tile indices, so the
    grid needs at most cdiv(T_lora, BLOCK_M) + S programs along M (a bound from shapes, not values); the few
    programs past the last tile return at once. Empty segments own no tile.
    """
    offs = tl.arange(0, BLOCK_S)
    lens = tl.load(seg_len_ptr + offs, mask=offs < num_segments, other=0)
    tiles = (lens + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(tiles, 0)  # inclusive: tile indices of segment g are [ends[g]-tiles[g], ends[g])
    seg = tl.sum((ends <= pid_m).to(tl.int32), 0)
    first_tile = tl.sum(tl.where(offs == seg, ends - tiles, 0), 0)
    valid = pid_m < tl.sum(tiles, 0)
    return seg, (pid_m - first_tile) * BLOCK_M, valid


def segment_block(num_segments: int) -> int:
    """Constexpr width of the segment-length vector each program scans (power of two, >= 16)."""
    return max(16, int(triton.next_power_of_2(max(1, num_segments))))
