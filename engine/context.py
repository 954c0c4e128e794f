"""Per-step batch metadata: everything layers need to know about the step, as tensors.

Why one object: layers see tensors plus this ``Context``, never requests or sequences. The runner builds it
once per step from the scheduler's decisions; attention and LoRA read from it.

Token layout: the step's tokens are grouped by sequence (sequence b owns tokens
``[token_start[b], token_start[b] + q_len[b])``). Attention runs on a padded [B, Qmax] x [B, Lmax] grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loraplex.kernels.types import LoRABatch


@dataclass
class SeqSlice:
    """One sequence's share of a step (host-side input to ``Context.build``)."""

    token_ids: list[int]  # the new tokens fed this step
    start_pos: int  # position of token_ids[0]
    block_table: list[int]  # KV blocks covering positions [0, start_pos + len(token_ids))
    slot: int  # adapter pool slot, -1 = base model
    num_logits: int  # how many trailing tokens of the slice need a logits row (1 = the sampling row only)


@dataclass
class Context:
    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    slot_mapping: torch.Tensor  # int64 [T]  flat KV slot (block * block_size + offset) of each new token
    q_index: torch.Tensor  # int64 [B, Qmax] token of query i of sequence b (padding -> 0)
    q_valid: torch.Tensor  # bool  [B, Qmax]
    q_pos: torch.Tensor  # int64 [B, Qmax] position of each padded query
    kv_index: torch.Tensor  # int64 [B, Lmax] flat KV slot of key j of sequence b (padding -> 0)
    kv_len: torch.Tensor  # int64 [B]
    logits_indices: torch.Tensor  # int64 [N] tokens whose logits are sampled
    logits_seqs: list[int]  # sequence index (into the step's slices) of each logits row
    lora: LoRABatch  # per token
    lora_logits: LoRABatch  # per logits row (lm_head LoRA)
    q_cells: torch.Tensor  # int64 [T] cell (b * Qmax + i) of each token in the padded grid, in token order
    decode_only: bool  # every sequence feeds exactly one token: the [B, Qmax] grid is the token axis itself
    block_tables: torch.Tensor  # int32 [B, blocks] the step's KV blocks per sequence (the decode kernel's view)
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)
    # Per-step values every layer would otherwise recompute (rotary cos/sin by table): built once, on first use.
    memo: dict[object, tuple[torch.Tensor, ...]] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def attention_mask(self, window: int | None) -> torch.Tensor:
        """bool [B, 1, Qmax, Lmax]: causal (and sliding-window) visibility, built once per window per step.

        Key j of a sequence sits at position j, so "causal" is ``j <= pos`` and a window w keeps
        ``pos - j < w`` (the Hugging Face convention). Padded query rows see key 0 only, so softmax stays finite.
        """
        cached = self._masks.get(window)
        if cached is not None:
            return cached
        lmax = int(self.kv_index.shape[1])
        j = torch.arange(lmax, device=self.kv_index.device).view(1, 1, lmax)
        pos = self.q_pos.unsqueeze(-1)  # [B, Qmax, 1]
        mask = (j <= pos) & (j < self.kv_len.view(-1, 1, 1))
        if window is not None:
            mask &= pos - j < window
        mask &= self.q_valid.unsqueeze(-1)
        mask[..., 0] |= ~self.q_valid
        mask = mask.unsqueeze(1)
        self._masks[window] = mask
        return mask

    @staticmethod
    def build(slices: list[SeqSlice], block_size: int, device: torch.device) -> Context:
        """One pass over the step's sequences in host integers, then a handful of tensor ops.

        Key slots are computed from each sequence's block table on the device side
        (``block * block_size + offset``) instead of listing every key position in Python.
        """
        input_ids: list[int] = []
        positions: list[int] = []
        token_slots: list[int] = []
        q_len: list[int] = []
        kv_len: list[int] = []
        logits_indices: list[int] = []
        logits_seqs: list[int] = []
        logits_slots: list[int] = []
        for b, s in enumerate(slices):
            n = len(s.token_ids)
            input_ids.extend(s.token_ids)
            positions.extend(range(s.start_pos, s.start_pos + n))
            token_slots.extend([s.slot] * n)
            q_len.append(n)
            kv_len.append(s.start_pos + n)
            if s.num_logits:
                logits_indices.extend(range(len(input_ids) - s.num_logits, len(input_ids)))
                logits_seqs.extend([b] * s.num_logits)
                logits_slots.extend([s.slot] * s.num_logits)

        def i64(values: list[int] | list[list[int]]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        num_seqs = len(slices)
        qmax = max(q_len, default=0)
        lmax = max(kv_len, default=0)
        blocks = -(-lmax // block_size)
        tables = i64([s.block_table[:blocks] + [0] * (blocks - len(s.block_table[:blocks])) for s in slices])
        offsets = torch.arange(block_size, dtype=torch.int64, device=device)
        kv_index = (tables.view(num_seqs, blocks, 1) * block_size + offsets).view(num_seqs, -1)[:, :lmax].contiguous()
        pos = i64(positions)
        q_len_t = i64(q_len)
        starts = i64(kv_len) - q_len_t  # position of each sequence's first new token
        i = torch.arange(qmax, dtype=torch.int64, device=device).view(1, -1)
        q_valid = i < q_len_t.view(-1, 1)
        first = torch.cumsum(q_len_t, 0) - q_len_t
        q_index = torch.where(q_valid, first.view(-1, 1) + i, 0)
        q_pos = torch.where(q_valid, starts.view(-1, 1) + i, 0)
        flat_kv = kv_index.reshape(-1)
        seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=device), q_len_t)
        slot_mapping = flat_kv[seq_of_token * lmax + pos] if num_seqs else pos
        return Context(
            input_ids=i64(input_ids),
            positions=pos,
            slot_mapping=slot_mapping,
            q_index=q_index,
            q_valid=q_valid,
            q_pos=q_pos,
            kv_index=kv_index,
            kv_len=i64(kv_len),
            logits_indices=i64(logits_indices),
            logits_seqs=logits_seqs,
            lora=LoRABatch.from_slots(token_slots, device),
            lora_logits=LoRABatch.from_slots(logits_slots, device),
            q_cells=q_valid.view(-1).nonzero().view(-1),
            decode_only=qmax == 1,
            block_tables=tables.to(torch.int32),
        )
