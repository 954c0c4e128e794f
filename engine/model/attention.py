"""Attention over the paged KV cache for a mixed prefill/decode step.

Two paths, chosen once per engine (``Context.triton``):
* Triton (CUDA): kernels read keys and values in place through the block tables — the split-KV decode kernel
  when every sequence feeds one token, the varlen prefill kernel (causal, sliding window, GQA) otherwise;
* torch (CPU): a step may mix a 300-token prompt chunk with 40 single-token decodes; gathering each sequence's
  keys through its block table into a [B, Lmax] grid lets one SDPA call serve them all, with causal and
  sliding-window masks from the ``Context``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loraplex.engine.context import Context
from loraplex.kernels.attention import paged_decode, paged_prefill


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Context) -> None:
    """Store the step's new keys/values (k, v: [T, n_kv, d]) at their paged slots."""
    flat_k = k_cache.view(-1, k_cache.shape[2], k_cache.shape[3])  # [blocks * block_size, n_kv, d]
    flat_v = v_cache.view(-1, v_cache.shape[2], v_cache.shape[3])
    flat_k.index_copy_(0, ctx.slot_mapping, k.to(flat_k.dtype))
    flat_v.index_copy_(0, ctx.slot_mapping, v.to(flat_v.dtype))


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    ctx: Context,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """q: [T, n_heads, d] -> [T, n_heads, d]; keys/values come from the cache (already holding this step's)."""
    if ctx.triton:
        q = q.contiguous()
        if ctx.decode_only:
            return paged_decode(q, k_cache, v_cache, ctx.block_tables, ctx.kv_len, scale, window)
        return paged_prefill(q, k_cache, v_cache, ctx.block_tables, ctx.q_start, ctx.q_len, ctx.kv_len, scale, window)
    return _padded_sdpa(q, k_cache, v_cache, ctx, scale, window)


def _padded_sdpa(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: Context, scale: float, window: int | None
) -> torch.Tensor:
    """Tokens are laid out sequence by sequence, so the valid cells of the [B, Qmax] grid, read row-major, are
    the token axis in order: the result is one gather of those cells (a plain view when every sequence decodes).
    """
    grid = ctx.grid
    if grid is None:
        raise RuntimeError("the torch attention path needs the padded grid (Context built with triton=False)")
    n_kv, d = k_cache.shape[2], k_cache.shape[3]
    t, n_heads = q.shape[0], q.shape[1]
    b, lmax = grid.kv_index.shape
    # index_select on the flat slot axis: a plain row copy, ~5x faster on CPU than advanced indexing.
    flat_index = grid.kv_index.reshape(-1)
    keys = k_cache.view(-1, n_kv, d).index_select(0, flat_index).view(b, lmax, n_kv, d).transpose(1, 2)
    values = v_cache.view(-1, n_kv, d).index_select(0, flat_index).view(b, lmax, n_kv, d).transpose(1, 2)
    # keys/values: [B, n_kv, Lmax, d]; queries: [B, n_heads, Qmax, d]; when decoding, B = T and Qmax = 1
    if ctx.decode_only:
        queries = q.unsqueeze(2)
    else:
        queries = q.index_select(0, grid.q_index.reshape(-1)).view(b, -1, n_heads, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        queries,
        keys,
        values,
        attn_mask=ctx.attention_mask(window),
        scale=scale,
        enable_gqa=n_heads != n_kv,
    )  # [B, n_heads, Qmax, d]
    if ctx.decode_only:
        return out.view(t, n_heads, d)
    return out.transpose(1, 2).reshape(-1, n_heads, d).index_select(0, grid.q_cells)
