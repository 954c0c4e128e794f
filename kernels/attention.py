"""The paged-attention kernels the engine dispatches to when its kernels are Triton (see ``engine.model.attention``).

Why a thin module: engine code must not import Triton at module load (CPU installs run without it), and the
decode/prefill split is one decision: decode-only steps (one query per sequence) use the split-KV decode kernel;
every other step uses the varlen prefill kernel. The torch reference of both lives in ``kernels.reference``.
"""

from __future__ import annotations

import torch


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """q: [B, n_heads, d] over k/v_cache [blocks, block_size, n_kv, d] -> [B, n_heads, d] (q's dtype).

    block_tables: int32 [B, max_blocks]; context_lens: int32 [B] (history incl. the current token).
    """
    from loraplex.kernels.triton_attention import paged_attention_decode

    return paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, scale, window=window)


def paged_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    q_start: torch.Tensor,
    q_len: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """q: [T, n_heads, d], sequences' new tokens contiguous -> [T, n_heads, d]; causal (+ window), GQA."""
    from loraplex.kernels.triton_prefill_attention import paged_attention_prefill

    return paged_attention_prefill(q, k_cache, v_cache, block_tables, q_start, q_len, context_lens, scale, window)
