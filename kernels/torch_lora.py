"""Fast torch (CPU) path of ``apply_lora``: a few batched matmuls per call instead of a loop over segments.

Why: on CPU a small tensor op costs a fixed few microseconds whatever its size, so a loop over segments x slices
(gather, shrink, expand, scatter each) spends most of a decode step in dispatch. Padding every segment to the
largest rank instead wastes multiply-adds when ranks mix (4..64). This path tiles the work like a grouped GEMM:

    tiles: each segment's tokens cut into tiles of N tokens (N chosen per step; padding cells point at token 0)
    pairs: (tile, rank-chunk of c rows) for every rank-chunk of the tile's adapter, per slice
    y[p]   = x[cells of p] @ A_chunk[p]              # one bmm for all slices' pairs:  [P, N, h_in] x [P, h_in, c]
    d[p]   = y[p] @ (scale * B_chunk[p])             # per slice: one bmm, written into one flat buffer
    out[cells of p, slice] += d[p]                   # one index_add_ for all slices (sums chunks)

The scatter views ``out`` [T, H] as rows of g = gcd(slice widths) columns: every slice's columns are whole rows
there, so all slices go back in one ``index_add_`` over contiguous rows (an ``index_add_`` into a column slice of
``out`` is strided and measured ~4x slower per element on CPU).

Chunks past an adapter's rank are zero rows and padding cells are zeroed, so the result equals the reference up
to float summation order, and the work is rank-exact up to one chunk per adapter. The pool stays rank-exact;
the chunked copies of A/B are cached per module for the step's tile→slot layout (``LoRAStepCache``) and rebuilt
only when that layout or the pool's tensors change (tracked with the tensors' in-place version counters, so a
load or an eviction can never leave a stale copy). Steady decoding reuses them step after step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from loraplex.kernels.types import LoRABatch, LoRASlice

# Cost-model constants, in padded token-cells: an extra tile costs about as much as this many padded cells
# (one more bmm batch entry per chunk), which keeps lone long prefill segments from padding every decode segment.
TILE_OVERHEAD_CELLS = 16
# An extra rank-chunk per (tile, adapter) costs about this many padded rank-rows (measured on CPU: chunks of 4 or
# 8 rows run 2-4x slower than 16-32 because every chunk is one more bmm entry and one more index_add_ row block).
CHUNK_OVERHEAD_ROWS = 24
_CHUNK_WIDTHS = (4, 8, 16, 32, 64)
_MAX_PLANS = 4  # a step uses two batches (tokens, logits rows); a few more tolerate interleaved callers


def _tile_width(lengths: Sequence[int]) -> int:
    """Token tile width N minimising padded cells + per-tile overhead over the step's segment lengths."""
    longest = max(lengths)
    candidates = {longest, *lengths, *(1 << k for k in range(longest.bit_length()))}
    best_n, best_cost = longest, float("inf")
    for n in sorted(c for c in candidates if 0 < c <= longest):
        tiles = sum(-(-length // n) for length in lengths)
        cost = tiles * n + tiles * TILE_OVERHEAD_CELLS
        if cost < best_cost:
            best_n, best_cost = n, cost
    return best_n


def _chunk_width(ranks: Sequence[int]) -> int:
    """Rank-chunk width c minimising padded rank-rows + per-chunk overhead for the tiles' ranks."""
    best_c, best_cost = _CHUNK_WIDTHS[-1], float("inf")
    for c in _CHUNK_WIDTHS:
        chunks = sum(-(-r // c) for r in ranks)
        cost = chunks * c + chunks * CHUNK_OVERHEAD_ROWS
        if cost < best_cost:
            best_c, best_cost = c, cost
    return best_c


# (cells [P * N], valid [P, N, 1] or None, dest rows of out.view(-1, g), g) of one module's pairs
_Scatter = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, int]


@dataclass
class SegmentPlan:
    """A batch's non-empty segments cut into token tiles (built once per batch, shared by every layer).

    tile_slots: pool slot of each tile
    width:      N, tokens per tile
    cells:      int64 [tiles, N] token of each cell (padding cells point at token 0)
    valid:      float32 [tiles, N, 1], 1 for real cells; None when no cell is padding
    """

    tile_slots: tuple[int, ...]
    width: int
    cells: torch.Tensor
    valid: torch.Tensor | None
    _scatter: dict[tuple[object, ...], _Scatter] = field(default_factory=dict)

    @staticmethod
    def build(batch: LoRABatch) -> SegmentPlan:
        segments = [batch.segment(g) for g in range(batch.num_segments)]
        segments = [s for s in segments if s[2] > 0]
        order = batch.token_order.long()
        if not segments:
            return SegmentPlan((), 0, torch.zeros(0, 0, dtype=torch.long, device=order.device), None)
        n = _tile_width([s[2] for s in segments])
        index: list[int] = []
        flags: list[float] = []
        slots: list[int] = []
        for slot, start, length in segments:
            for first in range(start, start + length, n):
                real = min(n, start + length - first)
                index.extend(range(first, first + real))
                index.extend([-1] * (n - real))
                flags.extend([1.0] * real + [0.0] * (n - real))
                slots.append(slot)
        positions = torch.tensor(index, dtype=torch.long, device=order.device)
        padded = positions < 0
        cells = order[positions.clamp(min=0)]
        cells[padded] = 0
        valid = None
        if bool(padded.any()):
            valid = torch.tensor(flags, dtype=torch.float32, device=order.device).view(len(slots), n, 1)
        return SegmentPlan(tuple(slots), n, cells.view(len(slots), n), valid)

    def scatter(self, module: _ChunkedModule, width: int) -> _Scatter:
        """(cells [P * N], valid [P, N, 1] or None, dest, g) of a module's pairs for an ``out`` of ``width``
        columns; ``dest`` is the row of ``out.view(-1, g)`` each g-wide block of the flat delta buffer lands on.
        Memoised per layout, since layers whose adapters target them with the same ranks share one layout."""
        key = (module.layout, module.group, width)
        known = self._scatter.get(key)
        if known is not None:
            return known
        tiles = torch.tensor(module.pair_tiles, dtype=torch.long, device=self.cells.device)
        cells = self.cells.index_select(0, tiles).view(-1)
        valid = None if self.valid is None else self.valid.index_select(0, tiles)
        n, g = self.width, math.gcd(module.group, width)
        dest: list[torch.Tensor] = []
        for sl in module.slices:
            rows = cells[sl.first * n : (sl.first + sl.count) * n]  # [P_s * N]
            blocks = torch.arange(int(sl.b.shape[2]) // g, device=cells.device) + sl.out_offset // g
            dest.append((rows.view(-1, 1) * (width // g) + blocks).view(-1))
        found = (cells, valid, torch.cat(dest), g)
        self._scatter[key] = found
        return found


@dataclass(frozen=True)
class _ChunkedSlice:
    """One slice's pairs: rows [first, first + count) of the shrink output; B chunks pre-scaled."""

    first: int
    count: int
    b: torch.Tensor  # float32 [count, c, h_out]
    out_offset: int


@dataclass(frozen=True)
class _ChunkedModule:
    """All slices of one fused module for one tile→slot layout, plus the stamp that proves it is current."""

    stamp: tuple[tuple[int, int], ...]
    tile_slots: tuple[int, ...]
    pair_tiles: tuple[int, ...]  # tile of each pair, all slices concatenated
    a: torch.Tensor  # float32 [P, h_in, c]
    slices: tuple[_ChunkedSlice, ...]
    group: int  # gcd of the slice widths and offsets: out is scattered as rows of gcd(group, H) columns
    layout: tuple[object, ...]  # what the scatter index depends on (besides the plan and H)


def _stamp(slices: Sequence[LoRASlice]) -> tuple[tuple[int, int], ...] | None:
    """(id, version) of every pool tensor a chunked copy is built from; None if versions are not tracked."""
    stamp: list[tuple[int, int]] = []
    try:
        for s in slices:
            w = s.weights
            for t in (w.a_rows, w.b_rows, w.row_table, w.ranks, w.scales):
                stamp.append((id(t), t._version))
    except RuntimeError:  # inference tensors carry no version counter: such pools are never cached
        return None
    return tuple(stamp)


def _build_module(
    slices: Sequence[LoRASlice], tile_slots: tuple[int, ...], stamp: tuple[tuple[int, int], ...]
) -> _ChunkedModule:
    """Gather every slice's rank-rows for the tiles' slots into zero-padded chunks of c rows."""
    device = slices[0].weights.a_rows.device
    host = [(s.weights.ranks.tolist(), s.weights.row_table.tolist(), s.weights.scales.tolist()) for s in slices]
    c = _chunk_width([int(ranks[slot]) for ranks, _, _ in host for slot in tile_slots])
    pair_tiles: list[int] = []
    a_parts: list[torch.Tensor] = []
    chunked: list[_ChunkedSlice] = []
    for s, (ranks, table, scales) in zip(slices, host, strict=True):
        rows: list[int] = []
        keep: list[float] = []
        scale: list[float] = []
        first = len(pair_tiles)
        for tile, slot in enumerate(tile_slots):
            r = int(ranks[slot])
            chunks = -(-r // c)
            pair_tiles.extend([tile] * chunks)
            rows.extend(table[slot][:r] + [0] * (chunks * c - r))
            keep.extend([1.0] * r + [0.0] * (chunks * c - r))
            scale.extend([float(scales[slot])] * (chunks * c))
        count = len(pair_tiles) - first
        if count == 0:
            continue
        index = torch.tensor(rows, dtype=torch.long, device=device)
        mask = torch.tensor(keep, dtype=torch.float32, device=device).view(count, c, 1)
        w = s.weights
        a_parts.append(w.a_rows.index_select(0, index).float().view(count, c, -1) * mask)
        scaled = mask * torch.tensor(scale, dtype=torch.float32, device=device).view(count, c, 1)
        b = w.b_rows.index_select(0, index).float().view(count, c, -1) * scaled
        chunked.append(_ChunkedSlice(first, count, b, s.out_offset))
    h_in = int(slices[0].weights.a_rows.shape[1])
    a = (
        torch.cat(a_parts).transpose(1, 2).contiguous()
        if a_parts
        else torch.zeros(0, h_in, c, dtype=torch.float32, device=device)
    )
    group = math.gcd(*[s.out_offset for s in slices], *[int(s.weights.b_rows.shape[1]) for s in slices])
    layout = (tuple(pair_tiles), tuple((c.first, c.count, c.out_offset, int(c.b.shape[2])) for c in chunked))
    return _ChunkedModule(stamp, tile_slots, tuple(pair_tiles), a, tuple(chunked), group, layout)


class LoRAStepCache:
    """Per-engine cache of segment plans (per batch) and chunked weights (per module and tile layout).

    Holds one chunked copy per module, for the latest layout seen, which in steady decoding is the next step's
    too; memory is bounded by the active adapters' rank-rows (plus at most one chunk each). Not thread-safe: the
    step loop is the only caller.
    """

    def __init__(self) -> None:
        self._plans: list[tuple[LoRABatch, SegmentPlan]] = []
        self._modules: dict[int, _ChunkedModule] = {}

    def plan(self, batch: LoRABatch) -> SegmentPlan:
        for known, plan in self._plans:
            if known is batch:
                return plan
        plan = SegmentPlan.build(batch)
        self._plans = [*self._plans[-(_MAX_PLANS - 1) :], (batch, plan)]
        return plan

    def module(self, slices: Sequence[LoRASlice], tile_slots: tuple[int, ...]) -> _ChunkedModule:
        stamp = _stamp(slices)
        key = id(slices[0].weights.a_rows)
        cached = self._modules.get(key)
        if stamp is not None and cached is not None and cached.stamp == stamp and cached.tile_slots == tile_slots:
            return cached
        built = _build_module(slices, tile_slots, stamp or ())
        if stamp is not None:
            self._modules[key] = built
        return built


def apply_lora_torch(
    x: torch.Tensor,
    out: torch.Tensor,
    batch: LoRABatch,
    slices: Sequence[LoRASlice],
    cache: LoRAStepCache | None = None,
) -> None:
    """``apply_lora`` on torch (x: [T, h_in], out: [T, sum(h_out)]); see the module docstring.

    Without a ``cache`` (one-off callers) the plan and chunked weights are built for this call only.
    """
    cache = cache if cache is not None else LoRAStepCache()
    plan = cache.plan(batch)
    if not plan.tile_slots or not slices:
        return
    module = cache.module(slices, plan.tile_slots)
    if not module.slices:
        return
    cells, valid, dest, g = plan.scatter(module, int(out.shape[1]))
    pairs, n = len(module.pair_tiles), plan.width
    xs = x.index_select(0, cells).view(pairs, n, -1)  # [P, N, h_in]
    y = torch.bmm(xs.float(), module.a)  # [P, N, c]
    if valid is not None:
        y = y * valid
    flat = torch.empty(int(dest.shape[0]) * g, dtype=torch.float32, device=x.device)
    start = 0
    for s in module.slices:
        size = s.count * n * int(s.b.shape[2])
        torch.bmm(y[s.first : s.first + s.count], s.b, out=flat[start : start + size].view(s.count, n, -1))
        start += size
    target = out if out.is_contiguous() else torch.zeros_like(out, memory_format=torch.contiguous_format)
    target.view(-1, g).index_add_(0, dest, flat.view(-1, g).to(out.dtype))
    if target is not out:
        out.add_(target)
