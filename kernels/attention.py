"""The one paged-decode-attention interface: the Triton kernel on CUDA, the torch reference elsewhere.

Engine code calls ``paged_attention_decode`` for steps in which every sequence feeds exactly one token; mixed
prefill/decode steps use PyTorch SDPA over gathered keys. ``LORAPLEX_LORA_BACKEND=torch`` (or
``kernels.lora.set_backend("torch")``) forces the reference here too, for debugging.
"""

from __future__ import annotations

import torch

from loraplex.kernels import reference
from loraplex.kernels.lora import get_backend


def use_triton_decode(q: torch.Tensor) -> bool:
    backend = get_backend()
    return backend == "triton" or (backend == "auto" and q.is_cuda)


def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q: [B, n_heads, d] over k/v_cache [blocks, block_size, n_kv, d] -> [B, n_heads, d] (q's dtype).

    block_tables: int32 [B, max_blocks]; context_lens: int32 [B] (history incl. the current token).
    """
    if use_triton_decode(q):
        from loraplex.kernels.triton_attention import paged_attention_decode as triton_decode

        return triton_decode(q, k_cache, v_cache, block_tables, context_lens, scale)
    return reference.paged_attention_decode_ref(q, k_cache, v_cache, block_tables, context_lens, scale)
