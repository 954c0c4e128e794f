"""Per-step batch metadata: everything layers need to know about the step, as tensors in fixed buffers.

Why one object: layers see tensors plus this ``Context``, never requests or sequences. The runner fills it once
per step from the scheduler's decisions; attention and LoRA read from it. Every tensor is a view of a buffer
preallocated at engine start (``ContextBuilder``): a step writes the host side with numpy and uploads the used
prefixes (nothing to copy on CPU), so device addresses never change — what a captured CUDA graph needs — and a
step allocates nothing on the device.

Token layout: the step's tokens are grouped by sequence (sequence b owns tokens
``[q_start[b], q_start[b] + q_len[b])``). The torch attention path (CPU) also gets a padded [B, Qmax] x [B, Lmax]
grid (``PaddedGrid``); the Triton kernels read the block tables directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from loraplex.kernels.buffers import MirroredBuffer
from loraplex.kernels.lora import LoRABackend
from loraplex.kernels.lora_step import LoRAStep
from loraplex.kernels.types import LoRABatch


@dataclass
class SeqSlice:
    """One sequence's share of a step (host-side input to ``ContextBuilder.build``)."""

    token_ids: list[int]  # the new tokens fed this step
    start_pos: int  # position of token_ids[0]
    block_table: list[int]  # KV blocks covering positions [0, start_pos + len(token_ids))
    slot: int  # adapter pool slot, -1 = base model, MERGED_SLOT = the adapter folded into the base weights
    num_logits: int  # trailing tokens that get a logits row: 0 none, 1 the last (sampling), len(token_ids) all


MERGED_SLOT = -2  # a sequence of the merged adapter: no LoRA work at all (its delta is in the base weights)


@dataclass(frozen=True)
class AdapterExtras:
    """A step's LoRA work beyond each token's own adapter (None on a ``Context`` when there is none).

    unmerge / unmerge_logits: tokens (logits rows) that need the merged adapter's negated delta — everything but
        the merged adapter's own — grouped into the negation's pool slot; None when no adapter is merged.
    dora_tokens / dora_rows: int64 [Td] the step's tokens of DoRA adapters and their factor rows in the pool's
        ``DoraStore`` (the per-column factor is applied after every delta); None when the step has none.
    """

    unmerge: LoRABatch | None = None
    unmerge_logits: LoRABatch | None = None
    dora_tokens: torch.Tensor | None = None
    dora_rows: torch.Tensor | None = None


@dataclass(frozen=True)
class PaddedGrid:
    """The torch attention path's view of the step: queries and keys padded per sequence.

    q_index:  int64 [B, Qmax] token of query i of sequence b (padding -> 0)
    q_pos:    int64 [B, Qmax] position of each padded query (padding -> 0, so it sees key 0 only)
    kv_index: int64 [B, Lmax] flat KV slot of key j of sequence b (padding -> block 0's slots, masked out)
    q_cells:  int64 [T] cell (b * Qmax + i) of each token in the padded grid, in token order
    """

    q_index: torch.Tensor
    q_pos: torch.Tensor
    kv_index: torch.Tensor
    q_cells: torch.Tensor


@dataclass
class Context:
    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    slot_mapping: torch.Tensor  # int64 [T]  flat KV slot (block * block_size + offset) of each new token
    q_start: torch.Tensor  # int32 [B] first token of each sequence
    q_len: torch.Tensor  # int32 [B] new tokens of each sequence
    kv_len: torch.Tensor  # int32 [B] history of each sequence incl. this step's tokens
    block_tables: torch.Tensor  # int32 [B, blocks] the step's KV blocks per sequence
    logits_indices: torch.Tensor  # int64 [N] tokens whose logits are computed, in slice order
    logits_seqs: list[int]  # sequence index (into the step's slices) of each logits row
    lora: LoRABatch  # per token
    lora_logits: LoRABatch  # per logits row (lm_head LoRA)
    decode_only: bool  # every sequence feeds exactly one token: the token axis is the sequence axis
    triton: bool  # attention runs the Triton paged kernels (else the padded torch path over ``grid``)
    grid: PaddedGrid | None  # present iff not ``triton``
    extras: AdapterExtras | None = None  # the merged adapter's negation and DoRA factors (set by the runner)
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)
    # Per-step values every layer would otherwise recompute (rotary cos/sin by table): built once, on first use.
    memo: dict[object, tuple[torch.Tensor, ...]] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def attention_mask(self, window: int | None) -> torch.Tensor:
        """bool [B, 1, Qmax, Lmax]: causal (and sliding-window) visibility, built once per window per step.

        Key j of a sequence sits at position j, so "causal" is ``j <= pos`` and a window w keeps
        ``pos - j < w`` (the Hugging Face convention). Padded query rows have position 0, so they see key 0
        only and softmax stays finite.
        """
        cached = self._masks.get(window)
        if cached is not None:
            return cached
        if self.grid is None:
            raise RuntimeError("attention_mask is for the padded torch attention path")
        lmax = int(self.grid.kv_index.shape[1])
        j = torch.arange(lmax, device=self.grid.kv_index.device).view(1, 1, lmax)
        pos = self.grid.q_pos.unsqueeze(-1)  # [B, Qmax, 1]
        mask = (j <= pos) & (j < self.kv_len.view(-1, 1, 1))
        if window is not None:
            mask &= pos - j < window
        mask = mask.unsqueeze(1)
        self._masks[window] = mask
        return mask


@dataclass(frozen=True)
class ContextCapacity:
    """Largest step the buffers hold: tokens (and logits rows), sequences, KV blocks per sequence."""

    max_tokens: int
    max_seqs: int
    max_blocks: int


class ContextBuilder:
    """Owns the step buffers and fills them from the scheduler's slices, once per step.

    ``scratch_block`` is a KV block no sequence owns: padding sequences of a CUDA-graph bucket write their keys
    there and read only it. ``triton`` selects the Triton attention layout (no padded grid).
    """

    def __init__(
        self,
        capacity: ContextCapacity,
        block_size: int,
        device: torch.device,
        lora: LoRABackend,
        triton: bool,
        scratch_block: int,
    ) -> None:
        self.capacity = capacity
        self.block_size = block_size
        self.device = device
        self.lora = lora
        self.triton = triton
        self.scratch_block = scratch_block
        t, b = capacity.max_tokens, capacity.max_seqs
        longs = {"input_ids": t, "positions": t, "slot_mapping": t, "logits_indices": t}
        if not triton:
            span = capacity.max_blocks * block_size
            longs.update(q_index=b * t, q_pos=b * t, kv_index=b * span, q_cells=t)
        self.longs = MirroredBuffer(longs, torch.int64, device)
        self.ints = MirroredBuffer(
            {"q_start": b, "q_len": b, "kv_len": b, "block_tables": b * capacity.max_blocks}, torch.int32, device
        )

    def build(self, slices: list[SeqSlice], pad_to: int = 0) -> Context:
        """The step's ``Context``; with ``pad_to`` (a decode bucket), padding sequences fill it to that size
        and the block tables take their full width, so every shape is the bucket's."""
        pad = max(0, pad_to - len(slices))
        num_seqs = len(slices) + pad
        if num_seqs > self.capacity.max_seqs:
            raise ValueError(f"{num_seqs} sequences exceed the preallocated {self.capacity.max_seqs}")
        q_len = np.array([len(s.token_ids) for s in slices] + [1] * pad, dtype=np.int64)
        start = np.array([s.start_pos for s in slices] + [0] * pad, dtype=np.int64)
        kv_len = start + q_len
        total = int(q_len.sum())
        if total > self.capacity.max_tokens:
            raise ValueError(f"{total} tokens exceed the preallocated {self.capacity.max_tokens}")
        q_start = np.cumsum(q_len) - q_len
        bs = self.block_size
        width = self.capacity.max_blocks if pad_to else int(-(-int(kv_len.max(initial=0)) // bs))
        if width > self.capacity.max_blocks:
            raise ValueError(
                f"a sequence needs {width} KV blocks, more than the preallocated {self.capacity.max_blocks}"
            )
        longs, ints = self.longs, self.ints

        flat: list[int] = []
        for s in slices:
            flat += s.token_ids
        longs.host_array("input_ids", total)[:] = flat + [0] * pad
        positions = longs.host_array("positions", total)
        positions[:] = np.arange(total) + np.repeat(start - q_start, q_len)
        tables = ints.host_array("block_tables", num_seqs * width).reshape(num_seqs, width)
        tables[:] = 0
        for b, s in enumerate(slices):
            row = s.block_table[:width]
            tables[b, : len(row)] = row
        tables[len(slices) :, 0] = self.scratch_block
        seq_of_token = np.repeat(np.arange(num_seqs), q_len)
        longs.host_array("slot_mapping", total)[:] = tables[seq_of_token, positions // bs] * bs + positions % bs
        ints.host_array("q_start", num_seqs)[:] = q_start
        ints.host_array("q_len", num_seqs)[:] = q_len
        ints.host_array("kv_len", num_seqs)[:] = kv_len

        num_logits = [min(s.num_logits, len(s.token_ids)) for s in slices] + [1] * pad
        ends = q_start + q_len
        rows = [i for b, n in enumerate(num_logits) for i in range(int(ends[b]) - n, int(ends[b]))]
        longs.host_array("logits_indices", len(rows))[:] = rows
        grid = None if self.triton else self._grid(q_len, start, q_start, tables, kv_len)
        longs.upload()
        ints.upload()

        seq_slots = [s.slot for s in slices] + [-1] * pad
        lora, lora_logits = self.lora.prepare(LoRAStep(seq_slots, q_len.tolist(), num_logits, pad_to))
        return Context(
            input_ids=longs.view("input_ids", total),
            positions=longs.view("positions", total),
            slot_mapping=longs.view("slot_mapping", total),
            q_start=ints.view("q_start", num_seqs),
            q_len=ints.view("q_len", num_seqs),
            kv_len=ints.view("kv_len", num_seqs),
            block_tables=ints.view("block_tables", num_seqs * width).view(num_seqs, width),
            logits_indices=longs.view("logits_indices", len(rows)),
            logits_seqs=[b for b, n in enumerate(num_logits[: len(slices)]) for _ in range(n)],
            lora=lora,
            lora_logits=lora_logits,
            decode_only=bool(num_seqs) and int(q_len.max()) == 1,
            triton=self.triton,
            grid=grid,
        )

    def _grid(
        self, q_len: np.ndarray, start: np.ndarray, q_start: np.ndarray, tables: np.ndarray, kv_len: np.ndarray
    ) -> PaddedGrid:
        """Fill the padded [B, Qmax] query grid and [B, Lmax] key grid of the torch attention path."""
        longs, bs = self.longs, self.block_size
        num_seqs, total = len(q_len), int(q_len.sum())
        qmax, lmax = int(q_len.max(initial=0)), int(kv_len.max(initial=0))
        i = np.arange(qmax)
        valid = i[None, :] < q_len[:, None]  # [B, Qmax]
        q_index = longs.host_array("q_index", num_seqs * qmax).reshape(num_seqs, qmax)
        q_index[:] = np.where(valid, q_start[:, None] + i, 0)
        q_pos = longs.host_array("q_pos", num_seqs * qmax).reshape(num_seqs, qmax)
        q_pos[:] = np.where(valid, start[:, None] + i, 0)
        keys = (tables[:, :, None].astype(np.int64) * bs + np.arange(bs)).reshape(num_seqs, -1)
        longs.host_array("kv_index", num_seqs * lmax).reshape(num_seqs, lmax)[:] = keys[:, :lmax]
        longs.host_array("q_cells", total)[:] = np.flatnonzero(valid)
        return PaddedGrid(
            q_index=longs.view("q_index", num_seqs * qmax).view(num_seqs, qmax),
            q_pos=longs.view("q_pos", num_seqs * qmax).view(num_seqs, qmax),
            kv_index=longs.view("kv_index", num_seqs * lmax).view(num_seqs, lmax),
            q_cells=longs.view("q_cells", total),
        )
