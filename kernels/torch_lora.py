"""Torch (CPU) LoRA: every slice of a fused module in a few batched matmuls, whatever the number of adapters.

Why: on CPU a small tensor op costs a fixed few microseconds whatever its size, so a loop over adapters x slices
spends a step in dispatch; and padding every adapter to the largest rank wastes multiply-adds when ranks mix.
This path tiles the work like a grouped GEMM:

    tiles: each segment's tokens cut into tiles of N tokens (N per step; padding cells point at token 0)
    pairs: (tile, rank-chunk of c rows) for every rank-chunk of the tile's adapter, per slice
    y[p]   = x[cells of p] @ A_chunk[p]ᵀ * (scale, 0 past the rank)    # one bmm for all slices' pairs
    d[p]   = y[p] @ B_chunk[p]                                           # per slice: one bmm into one buffer
    out[cells of p, slice] += d[p]                                       # one index_add_ for all slices

A decode step with many distinct adapters is the case N = 1: each token's own rank-rows, chunked, in one
gathered product (no Python-level work per adapter); a prefill keeps wide tiles (grouped GEMMs).

Cost model (constants measured on the development CPU with ``bench/lora_cpu.py --calibrate``; see RESULTS.md).
The matmuls read each pair's weight chunk once and are memory-bound at the tile widths a step uses, so
    time ≈ Σ_pairs c·H·(w + N·m) + per-pair fixed cost
with w = time per weight element read (and copied, when the step's adapters changed), m = per multiply-add.
Per step the plan picks N minimising ``tiles·N + tiles·TILE_COST_CELLS`` (a tile costs its weight reads, about
TILE_COST_CELLS padded token-cells), and per module c minimising ``chunks·c + chunks·CHUNK_COST_ROWS`` (a
chunk's fixed cost in rank-rows). So a decode step of 64 distinct adapters runs 64 one-token tiles (the
gathered product), 64 tokens of one adapter run as one tile, and a 300-token prompt next to decodes is cut
into tiles of 4-16 tokens.

Weights: the gathered chunks of A and B (float32) are kept per module for the step's tile→slot layout and
rebuilt only when that layout or the pool's tensors change (tracked with the tensors' in-place version
counters, so a load or an eviction can never leave a stale copy). The rebuild is a handful of vectorised
gathers into reused storage (no Python loop over adapters or rank-rows); steady decoding reuses the copies.
Scales and the rank mask are applied to the small shrink output ``y``, never to weight copies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from loraplex.kernels.types import LoRABatch, LoRAModuleWeights, LoRASlice

# A tile (one more bmm batch entry, one more copy and read of its adapter's chunks) costs as much as this many
# padded token-cells; a rank-chunk (one more bmm batch entry and scatter block) as much as this many padded
# rank-rows. Measured with ``bench/lora_cpu.py --calibrate`` on the 2-core development EPYC, fp32:
# tiles 0.7 (hidden 256, weights reused) .. 6 (hidden 1024, rebuilt every step); chunks 1 .. 5. The values
# sit in the middle of the rebuilt-every-step range, the case that matters when the batch's adapters churn.
TILE_COST_CELLS = 4
CHUNK_COST_ROWS = 3
_CHUNK_WIDTHS = (4, 8, 16, 32, 64)


def tile_width(lengths: Sequence[int]) -> int:
    """Token tile width N minimising padded cells + per-tile cost over the step's segment lengths."""
    longest = max(lengths)
    candidates = {longest, *lengths, *(1 << k for k in range(longest.bit_length()))}
    best_n, best_cost = longest, float("inf")
    for n in sorted(c for c in candidates if 0 < c <= longest):
        tiles = sum(-(-length // n) for length in lengths)
        cost = tiles * n + tiles * TILE_COST_CELLS
        if cost < best_cost:
            best_n, best_cost = n, cost
    return best_n


def chunk_width(ranks: Sequence[int]) -> int:
    """Rank-chunk width c minimising padded rank-rows + per-chunk cost for the tiles' ranks."""
    best_c, best_cost = _CHUNK_WIDTHS[-1], float("inf")
    for c in _CHUNK_WIDTHS:
        chunks = sum(-(-r // c) for r in ranks)
        cost = chunks * c + chunks * CHUNK_COST_ROWS
        if cost < best_cost:
            best_c, best_cost = c, cost
    return best_c


# (cells [P * N], valid [P, N, 1] or None, dest rows of out.view(-1, g), g) of one module's pairs
_Scatter = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, int]


@dataclass
class TilePlan:
    """A batch's non-empty segments cut into token tiles (built once per step, shared by every layer).

    tile_slots: pool slot of each tile (host) and ``slots`` (long [tiles], device)
    width:      N, tokens per tile
    cells:      long [tiles, N] token of each cell (padding cells point at token 0)
    valid:      float32 [tiles, N, 1], 1 for real cells; None when no cell is padding
    """

    tile_slots: tuple[int, ...]
    slots: torch.Tensor
    width: int
    cells: torch.Tensor
    valid: torch.Tensor | None
    _scatter: dict[tuple[object, ...], _Scatter] = field(default_factory=dict)

    @staticmethod
    def build(batch: LoRABatch, width: int | None = None) -> TilePlan:
        """``width`` forces N (calibration, tests); by default the cost model picks it."""
        segments = [batch.segment(g) for g in range(batch.num_segments)]
        segments = [s for s in segments if s[2] > 0]
        order = batch.token_order.long()
        device = order.device
        if not segments:
            empty = torch.zeros(0, dtype=torch.long, device=device)
            return TilePlan((), empty, 0, empty.view(0, 0), None)
        n = width or tile_width([s[2] for s in segments])
        index: list[int] = []
        flags: list[float] = []
        slots: list[int] = []
        for slot, start, length in segments:
            for first in range(start, start + length, n):
                real = min(n, start + length - first)
                index.extend(range(first, first + real))
                index.extend([first] * (n - real))  # padding cells read a real token; zeroed through ``valid``
                flags.extend([1.0] * real + [0.0] * (n - real))
                slots.append(slot)
        positions = torch.tensor(index, dtype=torch.long, device=device)
        cells = order.index_select(0, positions).view(len(slots), n)
        valid = None
        if len(slots) * n > sum(s[2] for s in segments):
            valid = torch.tensor(flags, dtype=torch.float32, device=device).view(len(slots), n, 1)
        slots_t = torch.tensor(slots, dtype=torch.long, device=device)
        return TilePlan(tuple(slots), slots_t, n, cells, valid)

    def scatter(self, module: _ChunkedModule, width: int) -> _Scatter:
        """(cells [P * N], valid [P, N, 1] or None, dest, g) of a module's pairs for an ``out`` of ``width``
        columns; ``dest`` is the row of ``out.view(-1, g)`` each g-wide block of the flat delta buffer lands on.
        Memoised per layout, since layers whose adapters target them with the same ranks share one layout."""
        key = (module.layout, module.group, width)
        known = self._scatter.get(key)
        if known is not None:
            return known
        tiles = module.pair_tiles
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
    """One slice's pairs: rows [first, first + count) of the shrink output."""

    first: int
    count: int
    b: torch.Tensor  # float32 [count, c, h_out]
    out_offset: int


@dataclass(frozen=True)
class _ChunkedModule:
    """All slices of one fused module for one tile→slot layout, plus the stamp that proves it is current."""

    stamp: tuple[object, ...]
    pair_tiles: torch.Tensor  # long [P]: tile of each pair, all slices concatenated
    rows: torch.Tensor  # long [P, c]: physical rank-row of each pair's chunk cells (any valid row past the rank)
    ymask: torch.Tensor  # float32 [P, 1, c]: the slot's scale, 0 past its rank
    a: torch.Tensor | None  # float32 [P, c, h_in]; None for the embedding (its shrink is a column gather)
    slices: tuple[_ChunkedSlice, ...]
    group: int  # gcd of the slice widths and offsets: out is scattered as rows of gcd(group, H) columns
    layout: tuple[object, ...]  # what the scatter index depends on (besides the plan and H)
    storage: torch.Tensor  # the flat float32 buffer ``a`` and every ``b`` live in (reused by the next rebuild)


def _versions(slices: Sequence[LoRASlice]) -> tuple[tuple[int, int], ...] | None:
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


class ChunkCache:
    """Per-engine cache of chunked weights (one entry per module, for its latest layout) and host ranks.

    Memory is bounded by the active adapters' rank-rows (plus at most one chunk each). Not thread-safe: the
    step loop is the only caller.
    """

    def __init__(self, chunk: int | None = None) -> None:
        self.chunk = chunk  # forces c (calibration, tests); by default the cost model picks it per module
        self._modules: dict[int, _ChunkedModule] = {}
        self._ranks: dict[int, tuple[int, list[int]]] = {}

    def host_ranks(self, w: LoRAModuleWeights) -> list[int]:
        """``w.ranks`` as a Python list, re-read only when the pool changed it."""
        try:
            version = w.ranks._version
        except RuntimeError:
            return [int(r) for r in w.ranks.tolist()]
        known = self._ranks.get(id(w.ranks))
        if known is not None and known[0] == version:
            return known[1]
        ranks = [int(r) for r in w.ranks.tolist()]
        self._ranks[id(w.ranks)] = (version, ranks)
        return ranks

    def module(self, slices: Sequence[LoRASlice], plan: TilePlan, embedding: bool = False) -> _ChunkedModule | None:
        """The module's chunked weights for ``plan``'s tiles; None if no tile's adapter targets it."""
        host = [self.host_ranks(s.weights) for s in slices]
        tile_ranks = [[ranks[slot] for slot in plan.tile_slots] for ranks in host]
        if not any(r for ranks in tile_ranks for r in ranks):
            return None
        versions = _versions(slices)
        c = self.chunk or chunk_width([r for ranks in tile_ranks for r in ranks])
        stamp = (versions, plan.tile_slots, c)
        key = id(slices[0].weights.a_rows)
        cached = self._modules.get(key)
        if versions is not None and cached is not None and cached.stamp == stamp:
            return cached
        reuse = cached.storage if cached is not None else None
        built = _build(slices, plan, tile_ranks, c, stamp, reuse, embedding)
        if versions is not None:
            self._modules[key] = built
        return built


def _pairs(tile_ranks: list[int], c: int) -> tuple[list[int], list[int]]:
    """(tile, chunk index) of every pair of one slice."""
    tiles: list[int] = []
    chunks: list[int] = []
    for tile, r in enumerate(tile_ranks):
        k = -(-r // c)
        tiles.extend([tile] * k)
        chunks.extend(range(k))
    return tiles, chunks


def _build(
    slices: Sequence[LoRASlice],
    plan: TilePlan,
    tile_ranks: list[list[int]],
    c: int,
    stamp: tuple[object, ...],
    reuse: torch.Tensor | None,
    embedding: bool,
) -> _ChunkedModule:
    """Gather every slice's rank-rows for the plan's tiles into chunks of c rows (vectorised)."""
    device = plan.cells.device
    arange_c = torch.arange(c, device=device)
    parts: list[tuple[LoRASlice, int, int, torch.Tensor]] = []  # (slice, first pair, count, rows [count, c])
    tiles_all: list[int] = []
    masks: list[torch.Tensor] = []
    for s, ranks in zip(slices, tile_ranks, strict=True):
        tiles, chunks = _pairs(ranks, c)
        if not tiles:
            continue
        w = s.weights
        tile_t = torch.tensor(tiles, dtype=torch.long, device=device)
        slot = plan.slots.index_select(0, tile_t)  # [count]
        cols = torch.tensor(chunks, dtype=torch.long, device=device).view(-1, 1) * c + arange_c  # [count, c]
        rank = w.ranks.index_select(0, slot).view(-1, 1).long()
        table = w.row_table.index_select(0, slot)  # int32 [count, R]
        rows = table.gather(1, cols.clamp(max=table.shape[1] - 1)).long()
        masks.append((cols < rank).float() * w.scales.index_select(0, slot).view(-1, 1))
        parts.append((s, len(tiles_all), len(tiles), rows))
        tiles_all.extend(tiles)
    total = len(tiles_all)
    h_in = int(slices[0].weights.a_rows.shape[1])
    need = sum(count * c * int(s.weights.b_rows.shape[1]) for s, _, count, _ in parts)
    need += 0 if embedding else total * c * h_in
    storage = (
        reuse if reuse is not None and reuse.numel() >= need else torch.empty(need, dtype=torch.float32, device=device)
    )
    at = 0

    def take(numel: int, shape: tuple[int, ...]) -> torch.Tensor:
        nonlocal at
        view = storage[at : at + numel].view(shape)
        at += numel
        return view

    def gather(source: torch.Tensor, rows: torch.Tensor, into: torch.Tensor) -> None:
        flat = into.view(-1, source.shape[1])
        if source.dtype == torch.float32:
            torch.index_select(source, 0, rows.view(-1), out=flat)
        else:
            flat.copy_(source.index_select(0, rows.view(-1)))

    a = None if embedding else take(total * c * h_in, (total, c, h_in))
    chunked: list[_ChunkedSlice] = []
    for s, first, count, rows in parts:
        if a is not None:
            gather(s.weights.a_rows, rows, a[first : first + count])
        h_out = int(s.weights.b_rows.shape[1])
        b = take(count * c * h_out, (count, c, h_out))
        gather(s.weights.b_rows, rows, b)
        chunked.append(_ChunkedSlice(first, count, b, s.out_offset))
    group = math.gcd(*[s.out_offset for s in slices], *[int(s.weights.b_rows.shape[1]) for s in slices])
    layout = (tuple(tiles_all), tuple((p.first, p.count, p.out_offset, int(p.b.shape[2])) for p in chunked))
    return _ChunkedModule(
        stamp=stamp,
        pair_tiles=torch.tensor(tiles_all, dtype=torch.long, device=device),
        rows=torch.cat([rows for *_, rows in parts]),
        ymask=torch.cat(masks).view(total, 1, c),
        a=a,
        slices=tuple(chunked),
        group=group,
        layout=layout,
        storage=storage,
    )


def _expand(y: torch.Tensor, module: _ChunkedModule, plan: TilePlan, out: torch.Tensor) -> None:
    """out[cells, slice] += y[p] @ B_chunk[p] for every pair (y: [P, N, c], scaled and masked)."""
    _, valid, dest, g = plan.scatter(module, int(out.shape[1]))
    if valid is not None:
        y = y * valid
    n = plan.width
    flat = torch.empty(int(dest.shape[0]) * g, dtype=torch.float32, device=y.device)
    start = 0
    for s in module.slices:
        size = s.count * n * int(s.b.shape[2])
        torch.bmm(y[s.first : s.first + s.count], s.b, out=flat[start : start + size].view(s.count, n, -1))
        start += size
    target = out if out.is_contiguous() else torch.zeros_like(out, memory_format=torch.contiguous_format)
    target.view(-1, g).index_add_(0, dest, flat.view(-1, g).to(out.dtype))
    if target is not out:
        out.add_(target)


def apply(x: torch.Tensor, out: torch.Tensor, slices: Sequence[LoRASlice], plan: TilePlan, cache: ChunkCache) -> None:
    """Add every slice's LoRA delta into ``out`` (x: [T, h_in], out: [T, sum(h_out)]); see the module docstring."""
    if not plan.tile_slots or not slices:
        return
    module = cache.module(slices, plan)
    if module is None or module.a is None:
        return
    cells, _, _, _ = plan.scatter(module, int(out.shape[1]))
    pairs, n = int(module.pair_tiles.shape[0]), plan.width
    xs = x.index_select(0, cells).view(pairs, n, -1)  # [P, N, h_in]
    y = torch.bmm(xs.float(), module.a.transpose(1, 2))  # [P, N, c]
    y.mul_(module.ymask)
    _expand(y, module, plan, out)


def embedding(
    token_ids: torch.Tensor, w: LoRAModuleWeights, out: torch.Tensor, plan: TilePlan, cache: ChunkCache
) -> None:
    """Embedding LoRA (``reference.lora_embedding_ref``): the shrink is a gather of A's columns by token id."""
    if not plan.tile_slots:
        return
    module = cache.module((LoRASlice(w, 0),), plan, embedding=True)
    if module is None:
        return
    cells, _, _, _ = plan.scatter(module, int(out.shape[1]))
    pairs, n = int(module.pair_tiles.shape[0]), plan.width
    ids = token_ids.index_select(0, cells).view(pairs, n, 1).long()  # [P, N, 1]
    y = w.a_rows[module.rows.view(pairs, 1, -1), ids].float()  # [P, N, c]: y[p, n, k] = A[row_pk, id_pn]
    y.mul_(module.ymask)
    _expand(y, module, plan, out)
