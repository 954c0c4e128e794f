"""The data the LoRA interface takes: per-step token grouping and per-module pool views.

Why a separate module: the runtime builds these, the torch reference and the Triton kernels read them, and
neither side should import the other. Fields are plain tensors so a step's metadata can live in preallocated,
fixed-shape buffers (CUDA-graph safe); the host-side segment list exists only for the CPU reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass(frozen=True)
class LoRABatch:
    """Which tokens of a step use which pool slot, grouped into segments of one slot each.

    token_order: int32 [T_lora]  indices into the step's token axis, grouped so each segment is contiguous;
                                  tokens that use no adapter do not appear (they cost nothing).
    seg_start:   int32 [S]        start of segment g in ``token_order``
    seg_len:     int32 [S]        number of tokens of segment g (may be 0 in padded buffers)
    seg_slot:    int32 [S]        pool slot of segment g
    host_segments: the same (slot, start, len) triples on the host, for the CPU path (no device syncs).
    token_slot:  int32 [T] or None  pool slot of every token of the step (-1 = none), for gathers indexed by
                                  token (embedding LoRA); None when the builder did not provide it.
    The engine's batches are views of preallocated buffers (``kernels.lora_step``); padded views (CUDA-graph
    buckets) carry zero-length segments and unused ``token_order`` entries past the last segment.
    """

    token_order: torch.Tensor
    seg_start: torch.Tensor
    seg_len: torch.Tensor
    seg_slot: torch.Tensor
    host_segments: tuple[tuple[int, int, int], ...] = field(default=())
    token_slot: torch.Tensor | None = None

    @property
    def num_segments(self) -> int:
        return len(self.host_segments) if self.host_segments else int(self.seg_slot.shape[0])

    def segment(self, g: int) -> tuple[int, int, int]:
        """(slot, start, length) of segment g, from the host copy when there is one."""
        if self.host_segments:
            return self.host_segments[g]
        return int(self.seg_slot[g]), int(self.seg_start[g]), int(self.seg_len[g])

    @property
    def is_empty(self) -> bool:
        return int(self.token_order.shape[0]) == 0

    @staticmethod
    def from_slots(token_slots: list[int], device: torch.device | str = "cpu") -> LoRABatch:
        """Group a per-token slot list (``-1`` = base model only) into sorted segments."""
        order: list[int] = []
        segments: list[tuple[int, int, int]] = []
        for slot in sorted({s for s in token_slots if s >= 0}):
            members = [t for t, s in enumerate(token_slots) if s == slot]
            segments.append((slot, len(order), len(members)))
            order.extend(members)
        token_slot = torch.tensor(token_slots, dtype=torch.int32, device=device)
        return replace(LoRABatch.from_segments(order, segments, device), token_slot=token_slot)

    @staticmethod
    def from_segments(
        order: list[int],
        segments: list[tuple[int, int, int]],
        device: torch.device | str = "cpu",
        keep_host: bool = True,
    ) -> LoRABatch:
        """Build the device tensors from a token order and (slot, start, length) segments."""

        def i32(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int32, device=device)

        return LoRABatch(
            token_order=i32(order),
            seg_start=i32([s[1] for s in segments]),
            seg_len=i32([s[2] for s in segments]),
            seg_slot=i32([s[0] for s in segments]),
            host_segments=tuple(segments) if keep_host else (),
        )


@dataclass(frozen=True)
class LoRAModuleWeights:
    """One target module (one layer's q_proj, say) of the adapter pool, rank-exact.

    a_rows:    [P, h_in]            row p is one rank-row of some adapter's A (A_s[j, :])
    b_rows:    [P, h_out]           row p is the matching rank-row of Bᵀ (B_s[:, j])
    row_table: int32 [slots, R]     physical row of rank-row j of slot s (R = the pool's max rank)
    ranks:     int32 [slots]        rank of slot s for this module; 0 = the adapter does not target it
    scales:    float32 [slots]      lora_alpha / r (or / sqrt(r) with rsLoRA), per module
    An adapter of rank r occupies exactly r rows: ranks mix without padding, and its cost follows its rank.
    """

    a_rows: torch.Tensor
    b_rows: torch.Tensor
    row_table: torch.Tensor
    ranks: torch.Tensor
    scales: torch.Tensor

    @property
    def max_rank(self) -> int:
        return int(self.row_table.shape[1])


@dataclass(frozen=True)
class LoRASlice:
    """One module's LoRA written into a column range of a fused output (q/k/v into qkv, gate/up)."""

    weights: LoRAModuleWeights
    out_offset: int
