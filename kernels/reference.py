"""Torch reference for batched LoRA and paged decode attention: the CPU path and every kernel's oracle.

Semantics are written for clarity, not speed; the Triton kernels must match them exactly (up to float
rounding). Shapes are given at each contract point.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from loraplex.kernels.types import LoRABatch, LoRAModuleWeights


def _active_segments(batch: LoRABatch, w: LoRAModuleWeights) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(slot, physical rank-rows, token indices) of every segment whose slot targets this module."""
    for g in range(batch.num_segments):
        s, start, length = batch.segment(g)
        r = int(w.ranks[s])
        if r == 0 or length == 0:
            continue
        yield s, w.row_table[s, :r].long(), batch.token_order[start : start + length].long()


def lora_shrink_ref(x: torch.Tensor, batch: LoRABatch, w: LoRAModuleWeights, y: torch.Tensor) -> None:
    """y[t, :r_s] = x[t] · A_sᵀ for every token t of a segment with slot s; other entries of y are untouched.

    Semantics:
        for each segment g:  s = seg_slot[g];  r = ranks[s]
            rows = row_table[s, :r]                      # physical rank-rows of slot s
            T_g  = token_order[seg_start[g] : seg_start[g] + seg_len[g]]
            y[T_g, :r] = x[T_g] @ a_rows[rows].T         # x: [T, h_in], a_rows: [P, h_in], y: [T, R]
    """
    for _, rows, tokens in _active_segments(batch, w):
        y[tokens, : rows.shape[0]] = (x[tokens].float() @ w.a_rows[rows].float().T).to(y.dtype)


def lora_expand_ref(
    y: torch.Tensor, batch: LoRABatch, w: LoRAModuleWeights, out: torch.Tensor, out_offset: int = 0
) -> None:
    """out[t, off:off+h_out] += scale_s · (y[t, :r_s] · B_sᵀ), in place.

    Semantics:
        for each segment g:  s = seg_slot[g];  r = ranks[s]
            rows = row_table[s, :r];  T_g as in shrink
            out[T_g, off : off + h_out] += scales[s] * (y[T_g, :r] @ b_rows[rows])   # b_rows: [P, h_out]
    """
    h_out = w.b_rows.shape[1]
    for s, rows, tokens in _active_segments(batch, w):
        delta = (y[tokens, : rows.shape[0]].float() @ w.b_rows[rows].float()) * float(w.scales[s])
        out[tokens, out_offset : out_offset + h_out] += delta.to(out.dtype)


def lora_embedding_ref(token_ids: torch.Tensor, batch: LoRABatch, w: LoRAModuleWeights, out: torch.Tensor) -> None:
    """Embedding LoRA: out[t] += scale_s · (A_s[:, id_t] · B_sᵀ), where A is stored transposed.

    For ``embed_tokens`` the pool stores ``a_rows`` as ``[P, vocab]`` (row j of slot s is A_s[j, :]), so the
    shrink step is a column gather instead of a matmul: y[t, j] = a_rows[row_table[s, j], id_t].
    """
    h_out = w.b_rows.shape[1]
    for s, rows, tokens in _active_segments(batch, w):
        ids = token_ids[tokens].long()
        y = w.a_rows[rows][:, ids].float().T  # [n, r]
        delta = (y @ w.b_rows[rows].float()) * float(w.scales[s])
        out[tokens, :h_out] += delta.to(out.dtype)


def paged_attention_decode_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """One query token per sequence attending over its paged KV history (GQA aware).

    Shapes:
        q:            [B, n_heads, head_dim]
        k_cache/v_cache: [num_blocks, block_size, n_kv_heads, head_dim]
        block_tables: int32 [B, max_blocks]   (entries past a sequence's length are ignored)
        context_lens: int32 [B]               (tokens of history incl. the current one, already written)
        window:       None, or keep only keys p with (L - 1) - p < window (sliding window)
        returns       [B, n_heads, head_dim] in q's dtype
    Semantics:
        for b: L = context_lens[b]; slots p < L live at block_tables[b, p // bs], offset p % bs
               head h reads kv head h // (n_heads // n_kv_heads); softmax(q·kᵀ·scale) · v in fp32
    """
    batch_size, n_heads, head_dim = q.shape
    block_size, n_kv = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv
    out = torch.empty_like(q)
    for b in range(batch_size):
        length = int(context_lens[b])
        n_blocks = (length + block_size - 1) // block_size
        blocks = block_tables[b, :n_blocks].long()
        k = k_cache[blocks].reshape(-1, n_kv, head_dim)[:length].float()  # [L, n_kv, d]
        v = v_cache[blocks].reshape(-1, n_kv, head_dim)[:length].float()
        first = 0 if window is None else max(0, length - window)
        k = k[first:].repeat_interleave(group, dim=1)  # [L', n_heads, d]
        v = v[first:].repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[b].float(), k) * scale
        probs = torch.softmax(scores, dim=-1)
        out[b] = torch.einsum("hl,lhd->hd", probs, v).to(q.dtype)
    return out


def paged_attention_prefill_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    q_start: torch.Tensor,
    q_len: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """Causal attention of every new token of a mixed prefill/decode step over its sequence's paged history.

    Shapes:
        q:            [T, n_heads, head_dim]   sequence b's new tokens are q[q_start[b] : q_start[b] + q_len[b]]
        k_cache/v_cache: [num_blocks, block_size, n_kv_heads, head_dim] (already holding this step's keys)
        block_tables: int32 [B, max_blocks];  q_start, q_len, context_lens: int32 [B]
        returns       [T, n_heads, head_dim] in q's dtype (rows of no sequence are zero)
    Semantics:
        for b: L = context_lens[b]; new token i sits at position p_i = L - q_len[b] + i and sees keys j with
               j <= p_i (causal) and, with a window w, p_i - j < w; GQA as in the decode reference; fp32 math.
    """
    n_heads, head_dim = q.shape[1], q.shape[2]
    block_size, n_kv = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv
    out = torch.zeros_like(q)
    for b in range(block_tables.shape[0]):
        length, n, start = int(context_lens[b]), int(q_len[b]), int(q_start[b])
        if n == 0:
            continue
        blocks = block_tables[b, : (length + block_size - 1) // block_size].long()
        k = k_cache[blocks].reshape(-1, n_kv, head_dim)[:length].float().repeat_interleave(group, dim=1)
        v = v_cache[blocks].reshape(-1, n_kv, head_dim)[:length].float().repeat_interleave(group, dim=1)
        pos = torch.arange(length - n, length).view(-1, 1)  # [n, 1]
        j = torch.arange(length).view(1, -1)  # [1, L]
        visible = j <= pos
        if window is not None:
            visible &= pos - j < window
        scores = torch.einsum("ihd,lhd->hil", q[start : start + n].float(), k) * scale
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start : start + n] = torch.einsum("hil,lhd->ihd", probs, v).to(q.dtype)
    return out
