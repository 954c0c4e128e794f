"""One step's LoRA metadata: token→slot grouping written into preallocated, fixed-capacity buffers.

Why preallocated: the kernels read the grouping from device memory; buffers at fixed addresses let a CUDA
graph captured once replay with every later step's grouping, and filling them costs no device allocation (one
host write + one copy per field, nothing on CPU). The grouping is computed per *sequence*, not per token: a
sequence's tokens are one contiguous run, so the work is O(sequences) plus one list of token indices.

Layout (``LoRABatch`` views, see ``kernels.types``): tokens of one slot are contiguous in ``token_order``, one
segment per slot in slot order; tokens of the base model appear in no segment. Logits rows (the tokens whose
logits are computed, for lm_head LoRA) get their own grouping over the row axis.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loraplex.kernels.buffers import MirroredBuffer
from loraplex.kernels.types import LoRABatch


@dataclass(frozen=True)
class LoRAStep:
    """Host description of a step's adapter use: one entry per sequence, sequences in token order.

    seq_slots:  pool slot of each sequence (-1 = base model only)
    seq_tokens: tokens each sequence feeds this step (its tokens follow the previous sequence's)
    seq_logits: logits rows of each sequence this step (rows follow the previous sequence's rows)
    pad_to:     0, or the CUDA-graph bucket: views get exactly this many tokens/rows (the sequences must cover
                them) and min(pad_to, num_slots) segments, the unused ones of length 0, so every shape a kernel
                launch depends on is the bucket's.
    """

    seq_slots: Sequence[int]
    seq_tokens: Sequence[int]
    seq_logits: Sequence[int]
    pad_to: int = 0


@dataclass(frozen=True)
class LoRACapacity:
    """Buffer sizes, fixed at engine start: the most tokens and logits rows a step can have, and the pool."""

    max_tokens: int
    max_logits: int
    num_slots: int


class LoRAStepMetadata:
    """The two groupings of a step (tokens, logits rows) in one mirrored int32 buffer."""

    def __init__(self, capacity: LoRACapacity, device: torch.device) -> None:
        self.capacity = capacity
        segments = max(1, capacity.num_slots)
        self.buffer = MirroredBuffer(
            {
                "tok_order": capacity.max_tokens,
                "tok_slot": capacity.max_tokens,
                "tok_seg": 3 * segments,
                "log_order": capacity.max_logits,
                "log_slot": capacity.max_logits,
                "log_seg": 3 * segments,
            },
            torch.int32,
            device,
        )
        self._segments = segments

    def fill(self, step: LoRAStep) -> tuple[LoRABatch, LoRABatch]:
        """Write the step's groupings and return them as views (tokens, logits rows); uploads on CUDA."""
        tokens = self._group("tok", step.seq_slots, step.seq_tokens, step.pad_to)
        logits = self._group("log", step.seq_slots, step.seq_logits, step.pad_to)
        self.buffer.upload()
        return tokens, logits

    def _group(self, prefix: str, seq_slots: Sequence[int], counts: Sequence[int], pad_to: int) -> LoRABatch:
        buf = self.buffer
        total = sum(counts)
        width = max(total, pad_to)
        if width > buf.capacity(f"{prefix}_order"):
            raise ValueError(
                f"step has {width} LoRA rows, more than the preallocated {buf.capacity(prefix + '_order')}"
            )
        starts: list[int] = []
        slot_of_row: list[int] = []
        at = 0
        for slot, n in zip(seq_slots, counts, strict=True):
            starts.append(at)
            slot_of_row.extend([slot] * n)
            at += n
        slot_of_row.extend([-1] * (width - total))
        # Sequences sorted by slot (stable: token order within a slot); each distinct slot is one segment.
        order: list[int] = []
        segments: list[tuple[int, int, int]] = []
        for b in sorted((b for b, s in enumerate(seq_slots) if s >= 0 and counts[b] > 0), key=seq_slots.__getitem__):
            slot, n = seq_slots[b], counts[b]
            if segments and segments[-1][0] == slot:
                last = segments[-1]
                segments[-1] = (slot, last[1], last[2] + n)
            else:
                segments.append((slot, len(order), n))
            order.extend(range(starts[b], starts[b] + n))
        num_segments = len(segments)
        if pad_to:
            num_segments = max(num_segments, min(pad_to, self._segments))
        buf.host_array(f"{prefix}_slot", width)[:] = slot_of_row
        host_order = buf.host_array(f"{prefix}_order", width if pad_to else len(order))
        host_order[: len(order)] = order
        host_order[len(order) :] = 0
        seg = buf.host_array(f"{prefix}_seg", 3 * self._segments).reshape(3, self._segments)
        padded = segments + [(0, len(order), 0)] * (num_segments - len(segments))
        if padded:
            seg[:, :num_segments] = list(zip(*padded, strict=True))
        table = buf.view(f"{prefix}_seg", 3 * self._segments).view(3, self._segments)
        return LoRABatch(
            token_order=buf.view(f"{prefix}_order", width if pad_to else len(order)),
            seg_start=table[1, :num_segments],
            seg_len=table[2, :num_segments],
            seg_slot=table[0, :num_segments],
            host_segments=tuple(segments),
            token_slot=buf.view(f"{prefix}_slot", width),
        )
