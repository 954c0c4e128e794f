# mypy: disable-error-code="untyped-decorator,no-untyped-def"
# (Triton @jit kernels take untyped tensor/constexpr handles; the host-side launcher below is fully typed.)
"""Triton paged decode attention: one query token per sequence over its paged KV history, GQA aware.

One program per (sequence, kv head, partition) serves all query heads of that kv head, so each K/V row is read
once per group instead of once per query head. Tokens are gathered BLOCK_N at a time through the block table
(any KV block size works), with an online softmax in fp32. Long histories are split into partitions that run
in parallel (flash-decoding); a second small kernel merges the partial softmax states. The partition count
comes from the block table's width, never from ``context_lens`` values, so the launch is CUDA-graph safe.

Semantics (see ``reference.paged_attention_decode_ref``):
    for b, h: L = context_lens[b];  kv head = h // (n_heads // n_kv_heads)
              key/value p < L live at block_tables[b, p // block_size], offset p % block_size
              (with a sliding window w: only keys p >= L - w)
              out[b, h] = softmax(q[b, h] · Kᵀ · scale) · V        (fp32 math, q's dtype out)
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from loraplex.kernels.triton_configs import ATTENTION_CONFIGS, bucket, prune_attention
from loraplex.kernels.triton_lora_meta import dot_dtype, dot_precision

DEFAULT_PARTITION = 512
_NEG = tl.constexpr(-1.0e30)  # finite "minus infinity": empty partitions never produce inf - inf = nan


@triton.jit
def _decode_kernel(
    q_ptr,  # [B, H, D]
    k_ptr,  # [num_blocks, block_size, n_kv, D]
    v_ptr,
    block_tables_ptr,  # int32 [B, max_blocks]
    context_lens_ptr,  # int32 [B]
    out_ptr,  # [B, H, D] (single-partition launch)
    part_m_ptr,  # fp32 [B, H, P]  running max per partition
    part_l_ptr,  # fp32 [B, H, P]  softmax denominator per partition
    part_acc_ptr,  # fp32 [B, H, P, D] unnormalised output per partition
    scale,
    window,  # 0 = no sliding window; else keys p >= L - window only
    head_dim,
    block_size,
    partition_size,
    num_partitions,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bt,
    stride_ob,
    stride_oh,
    ctx_class,  # autotune key only
    GROUP: tl.constexpr,
    G_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    SINGLE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    length = tl.load(context_lens_ptr + b)
    start = part * partition_size
    if start >= tl.maximum(length, 1):  # partitions past the history; partition 0 always writes its result
        return
    end = tl.minimum(start + partition_size, length)
    lo = start
    if window > 0:
        lo = tl.maximum(start, length - window)  # a partition wholly before the window keeps its empty state

    offs_g = tl.arange(0, G_PAD)
    mask_g = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    offs_d = tl.arange(0, D_PAD)
    mask_d = offs_d < head_dim
    q_ptrs = q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_g[:, None] & mask_d[None, :], other=0.0).to(DOT_DTYPE)

    m_i = tl.full((G_PAD,), _NEG, dtype=tl.float32)
    l_i = tl.zeros((G_PAD,), dtype=tl.float32)
    acc = tl.zeros((G_PAD, D_PAD), dtype=tl.float32)
    table = block_tables_ptr + b.to(tl.int64) * stride_bt
    k_head = k_ptr + kvh * stride_kh
    v_head = v_ptr + kvh * stride_vh
    for n0 in range(lo, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        mask_n = pos < end
        blk = tl.load(table + pos // block_size, mask=mask_n, other=0).to(tl.int64)
        off = pos % block_size
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(
            k_head + blk[:, None] * stride_kb + off[:, None] * stride_ks + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        scores = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=PRECISION) * scale  # [G_PAD, BLOCK_N]
        scores = tl.where(mask_n[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_head + blk[:, None] * stride_vb + off[:, None] * stride_vs + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=PRECISION)
        m_i = m_new

    mask_gd = mask_g[:, None] & mask_d[None, :]
    if SINGLE:
        result = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # empty history -> zeros, like the reference
        o_ptrs = out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, result.to(out_ptr.dtype.element_ty), mask=mask_gd)
    else:
        row = (b.to(tl.int64) * GROUP * tl.num_programs(1) + heads) * num_partitions + part  # [G_PAD]
        tl.store(part_m_ptr + row, m_i, mask=mask_g)
        tl.store(part_l_ptr + row, l_i, mask=mask_g)
        tl.store(part_acc_ptr + row[:, None] * head_dim + offs_d[None, :], acc, mask=mask_gd)


_decode_tuned = triton.autotune(
    configs=ATTENTION_CONFIGS,
    key=["head_dim", "block_size", "partition_size", "ctx_class", "GROUP"],
    prune_configs_by={"early_config_prune": prune_attention},
)(_decode_kernel)


@triton.jit
def _merge_kernel(
    out_ptr,  # [B, H, D]
    part_m_ptr,
    part_l_ptr,
    part_acc_ptr,
    context_lens_ptr,
    head_dim,
    partition_size,
    num_partitions,
    stride_ob,
    stride_oh,
    P_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
):
    """Combine per-partition softmax states: out = Σ_p e^(m_p - M) acc_p / Σ_p e^(m_p - M) l_p."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    used = tl.cdiv(tl.load(context_lens_ptr + b), partition_size)
    offs_p = tl.arange(0, P_PAD)
    mask_p = offs_p < used
    row = (b.to(tl.int64) * tl.num_programs(1) + h) * num_partitions + offs_p
    m = tl.load(part_m_ptr + row, mask=mask_p, other=_NEG)
    weight = tl.where(mask_p, tl.exp(m - tl.max(m, 0)), 0.0)
    denom = tl.sum(weight * tl.load(part_l_ptr + row, mask=mask_p, other=0.0), 0)
    offs_d = tl.arange(0, D_PAD)
    mask_d = offs_d < head_dim
    acc = tl.load(
        part_acc_ptr + row[:, None] * head_dim + offs_d[None, :],
        mask=mask_p[:, None] & mask_d[None, :],
        other=0.0,
    )
    result = tl.sum(weight[:, None] * acc, 0) / tl.where(denom > 0, denom, 1.0)
    o_ptrs = out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d
    tl.store(o_ptrs, result.to(out_ptr.dtype.element_ty), mask=mask_d)


def _check(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError("expected q [B, H, D] and k_cache/v_cache [num_blocks, block_size, n_kv, D] alike")
    batch, n_heads, head_dim = q.shape
    n_kv = int(k_cache.shape[2])
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"cache head_dim {k_cache.shape[3]} != query head_dim {head_dim}")
    if n_kv == 0 or n_heads % n_kv != 0:
        raise ValueError(f"n_heads {n_heads} must be a multiple of n_kv_heads {n_kv}")
    if q.dtype != k_cache.dtype or q.dtype != v_cache.dtype:
        raise TypeError("q, k_cache and v_cache must share a dtype")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs a unit stride along head_dim")
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError("block_tables must be int32 [B, max_blocks]")
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables needs a unit stride along its last dimension")
    if context_lens.dtype != torch.int32 or tuple(context_lens.shape) != (batch,) or context_lens.stride(0) != 1:
        raise ValueError("context_lens must be a contiguous int32 [B] tensor")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, expected {q.device}")
    if context_lens.device != q.device:
        raise ValueError(f"context_lens is on {context_lens.device}, expected {q.device}")


def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    partition_size: int | None = None,
    config: triton.Config | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Decode attention over a paged KV cache; returns [B, n_heads, head_dim] in q's dtype.

    ``window`` keeps only the last ``window`` keys of each history (sliding-window layers).

    ``partition_size`` (tokens per parallel split, default 512) and ``config`` are knobs for tests and
    benchmarks; the result does not depend on them beyond float rounding.
    """
    _check(q, k_cache, v_cache, block_tables, context_lens)
    part = DEFAULT_PARTITION if partition_size is None else int(partition_size)
    if part <= 0:
        raise ValueError(f"partition_size must be positive, got {part}")
    batch, n_heads, head_dim = (int(d) for d in q.shape)
    block_size, n_kv = int(k_cache.shape[1]), int(k_cache.shape[2])
    group = n_heads // n_kv
    out = torch.empty((batch, n_heads, head_dim), dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    max_ctx = int(block_tables.shape[1]) * block_size
    num_parts = max(1, triton.cdiv(max_ctx, part))
    single = num_parts == 1
    d_pad = max(16, int(triton.next_power_of_2(head_dim)))
    if single:
        part_m = part_l = part_acc = out  # unused by the single-partition specialisation
    else:
        part_m = torch.empty((batch, n_heads, num_parts), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty((batch, n_heads, num_parts, head_dim), dtype=torch.float32, device=q.device)

    args: tuple[Any, ...] = (
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        part_m,
        part_l,
        part_acc,
        float(scale),
        0 if window is None else int(window),
        head_dim,
        block_size,
        part,
        num_parts,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        bucket(max_ctx, (512, 2048, 8192, 32768, 131072)),
    )
    consts: dict[str, Any] = {
        "GROUP": group,
        "G_PAD": max(16, int(triton.next_power_of_2(group))),
        "D_PAD": d_pad,
        "DOT_DTYPE": dot_dtype(q.dtype),
        "PRECISION": dot_precision(q.dtype),
        "SINGLE": single,
    }
    grid = (batch, n_kv, num_parts)
    if config is None:
        _decode_tuned[grid](*args, **consts)
    else:
        _decode_kernel[grid](*args, **consts, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    if not single:
        _merge_kernel[(batch, n_heads)](
            out,
            part_m,
            part_l,
            part_acc,
            context_lens,
            head_dim,
            part,
            num_parts,
            out.stride(0),
            out.stride(1),
            P_PAD=max(2, int(triton.next_power_of_2(num_parts))),
            D_PAD=d_pad,
        )
    return out
