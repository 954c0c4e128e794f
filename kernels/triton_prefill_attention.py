# mypy: disable-error-code="untyped-decorator,no-untyped-def"
# (Triton @jit kernels take untyped tensor/constexpr handles; the host-side launcher below is fully typed.)
"""Triton paged attention for prefill and mixed steps: varlen queries, causal, sliding window, GQA.

Why: a mixed step holds prompt chunks of any length next to single-token decodes. Padding every sequence to the
longest and running SDPA with a mask (the CPU path) wastes work quadratic in the padding and first copies every
key out of the paged cache. This kernel reads keys and values in place through the block tables, and each
program handles one tile of one sequence's new tokens for one kv head: the tile's tokens x the kv head's query
heads are the rows of one ``tl.dot``, so every K/V row is read once per GQA group.

Grid (cdiv(T, BLOCK_M) + B, n_kv_heads): tiles never straddle sequences (``segment_tile`` over the query
lengths), so the grid is a bound from shapes; programs past the last tile return at once.

Semantics (see ``reference.paged_attention_prefill_ref``):
    for b: L = context_lens[b]; new token i of b is q[q_start[b] + i] at position p_i = L - q_len[b] + i
           out[q_start[b] + i, h] = softmax_j(q·k_j·scale) · v_j over keys j <= p_i (and p_i - j < window),
           key j at block_tables[b, j // block_size], offset j % block_size; kv head h // (H / n_kv)
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from loraplex.kernels.triton_configs import PREFILL_CONFIGS, prune_prefill
from loraplex.kernels.triton_lora_meta import dot_dtype, dot_precision, segment_block, segment_tile

_NEG = tl.constexpr(-1.0e30)


@triton.jit
def _prefill_kernel(
    q_ptr,  # [T, H, D]
    k_ptr,  # [num_blocks, block_size, n_kv, D]
    v_ptr,
    out_ptr,  # [T, H, D]
    block_tables_ptr,  # int32 [B, max_blocks]
    q_start_ptr,  # int32 [B]
    q_len_ptr,  # int32 [B]
    context_lens_ptr,  # int32 [B]
    num_seqs,
    scale,
    window,  # 0 = none
    head_dim,
    block_size,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bt,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,
    G_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    kvh = tl.program_id(1)
    seq, m0, valid = segment_tile(pid_m, q_len_ptr, num_seqs, BLOCK_M, BLOCK_S)
    if not valid:
        return
    n_new = tl.load(q_len_ptr + seq)
    length = tl.load(context_lens_ptr + seq)
    first_token = tl.load(q_start_ptr + seq)

    # Rows of the tile: (token i, head g of the group) -> row i * G_PAD + g.
    rows = tl.arange(0, BLOCK_M * G_PAD)
    tok = m0 + rows // G_PAD
    g = rows % G_PAD
    mask_row = (tok < n_new) & (g < GROUP)
    pos = length - n_new + tok  # [ROWS] position of each row's token
    head = kvh * GROUP + g
    offs_d = tl.arange(0, D_PAD)
    mask_d = offs_d < head_dim
    t_index = (first_token + tok).to(tl.int64)
    q_ptrs = q_ptr + t_index[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_row[:, None] & mask_d[None, :], other=0.0).to(DOT_DTYPE)

    last_pos = length - n_new + tl.minimum(m0 + BLOCK_M, n_new) - 1  # newest token of the tile
    hi = last_pos + 1
    lo = hi * 0
    if window > 0:
        lo = tl.maximum(lo, length - n_new + m0 - window + 1)  # oldest key the tile's first token still sees

    m_i = tl.full((BLOCK_M * G_PAD,), _NEG, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M * G_PAD,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M * G_PAD, D_PAD), dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_head = k_ptr + kvh * stride_kh
    v_head = v_ptr + kvh * stride_vh
    for n0 in range(lo, hi, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)
        mask_n = j < hi
        blk = tl.load(table + j // block_size, mask=mask_n, other=0).to(tl.int64)
        off = j % block_size
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(
            k_head + blk[:, None] * stride_kb + off[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0
        )
        scores = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=PRECISION) * scale  # [ROWS, BLOCK_N]
        visible = (j[None, :] <= pos[:, None]) & mask_n[None, :]
        if window > 0:
            visible = visible & (pos[:, None] - j[None, :] < window)
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_head + blk[:, None] * stride_vb + off[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=PRECISION)
        m_i = m_new

    result = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = out_ptr + t_index[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, result.to(out_ptr.dtype.element_ty), mask=mask_row[:, None] & mask_d[None, :])


_prefill_tuned = triton.autotune(
    configs=PREFILL_CONFIGS,
    key=["head_dim", "block_size", "GROUP"],
    prune_configs_by={"early_config_prune": prune_prefill},
)(_prefill_kernel)


def _check(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_tensors: tuple[torch.Tensor, ...],
) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError("expected q [T, H, D] and k_cache/v_cache [num_blocks, block_size, n_kv, D] alike")
    n_heads, head_dim, n_kv = int(q.shape[1]), int(q.shape[2]), int(k_cache.shape[2])
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"cache head_dim {k_cache.shape[3]} != query head_dim {head_dim}")
    if n_kv == 0 or n_heads % n_kv != 0:
        raise ValueError(f"n_heads {n_heads} must be a multiple of n_kv_heads {n_kv}")
    if q.dtype != k_cache.dtype or q.dtype != v_cache.dtype:
        raise TypeError("q, k_cache and v_cache must share a dtype")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs a unit stride along head_dim")
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.stride(1) != 1:
        raise ValueError("block_tables must be int32 [B, max_blocks] with a unit last stride")
    batch = int(block_tables.shape[0])
    for t in seq_tensors:
        if t.dtype != torch.int32 or tuple(t.shape) != (batch,) or t.stride(0) != 1:
            raise ValueError("q_start, q_len and context_lens must be contiguous int32 [B] tensors")
    for t in (k_cache, v_cache, block_tables, *seq_tensors):
        if t.device != q.device:
            raise ValueError(f"every input must be on {q.device}, got one on {t.device}")


def paged_attention_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    q_start: torch.Tensor,
    q_len: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    window: int | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """Attention of a step's new tokens (q: [T, H, D]) over their paged histories; [T, H, D] in q's dtype.

    Rows of q that belong to no sequence are left unwritten (zeros). ``config`` pins a kernel config (tests).
    """
    _check(q, k_cache, v_cache, block_tables, (q_start, q_len, context_lens))
    if window is not None and window <= 0:
        raise ValueError(f"window must be positive, got {window}")
    num_tokens, n_heads, head_dim = (int(d) for d in q.shape)
    num_seqs = int(block_tables.shape[0])
    out = torch.zeros_like(q)
    if num_tokens == 0 or num_seqs == 0:
        return out
    n_kv = int(k_cache.shape[2])
    group = n_heads // n_kv

    def grid(meta: dict[str, Any]) -> tuple[int, int]:
        return (triton.cdiv(num_tokens, meta["BLOCK_M"]) + num_seqs, n_kv)

    args = (
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        q_start,
        q_len,
        context_lens,
        num_seqs,
        float(scale),
        0 if window is None else int(window),
        head_dim,
        int(k_cache.shape[1]),
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
    )
    consts: dict[str, Any] = {
        "GROUP": group,
        "G_PAD": int(triton.next_power_of_2(group)),
        "D_PAD": max(16, int(triton.next_power_of_2(head_dim))),
        "DOT_DTYPE": dot_dtype(q.dtype),
        "PRECISION": dot_precision(q.dtype),
        "BLOCK_S": segment_block(num_seqs),
    }
    if config is None:
        _prefill_tuned[grid](*args, **consts)
    else:
        _prefill_kernel[grid](
            *args, **consts, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages
        )
    return out
