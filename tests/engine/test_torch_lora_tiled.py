"""The tiled torch LoRA path (``kernels.torch_lora``) equals the reference, and its caches never go stale."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraplex.kernels import reference
from loraplex.kernels.torch_lora import ChunkCache, TilePlan, apply
from loraplex.kernels.types import LoRABatch, LoRAModuleWeights, LoRASlice

MAX_RANK = 64


def _weights(h_in: int, h_out: int, ranks: list[int], g: torch.Generator) -> LoRAModuleWeights:
    """A rank-exact pool with scattered rows (a random permutation), so no slot's rows are consecutive."""
    rows = sum(ranks) + 5
    perm = torch.randperm(rows, generator=g).tolist()
    table = torch.zeros(len(ranks), MAX_RANK, dtype=torch.int32)
    taken = 0
    for s, r in enumerate(ranks):
        table[s, :r] = torch.tensor(perm[taken : taken + r], dtype=torch.int32)
        taken += r
    return LoRAModuleWeights(
        a_rows=torch.randn(rows, h_in, generator=g) * 0.1,
        b_rows=torch.randn(rows, h_out, generator=g) * 0.1,
        row_table=table,
        ranks=torch.tensor(ranks, dtype=torch.int32),
        scales=torch.rand(len(ranks), generator=g) + 0.5,
    )


def apply_lora_torch(
    x: torch.Tensor, out: torch.Tensor, batch: LoRABatch, slices: list[LoRASlice], cache: ChunkCache | None = None
) -> None:
    apply(x, out, slices, TilePlan.build(batch), cache or ChunkCache())


def _reference(x: torch.Tensor, base: torch.Tensor, batch: LoRABatch, slices: list[LoRASlice]) -> torch.Tensor:
    want = base.clone()
    for s in slices:
        y = torch.zeros(x.shape[0], s.weights.max_rank)
        reference.lora_shrink_ref(x, batch, s.weights, y)
        reference.lora_expand_ref(y, batch, s.weights, want, s.out_offset)
    return want


def _fused(h_in: int, outs: list[int], slots: int, g: torch.Generator) -> list[LoRASlice]:
    """Slices of a fused projection; each slice gets its own random ranks (0 = not targeted), 1..64 mixed."""
    choices = [0, 1, 3, 4, 8, 12, 16, 31, 32, 64]
    slices, offset = [], 0
    for h_out in outs:
        ranks = [choices[int(i)] for i in torch.randint(len(choices), (slots,), generator=g)]
        slices.append(LoRASlice(_weights(h_in, h_out, ranks, g), offset))
        offset += h_out
    return slices


@pytest.mark.parametrize("seed", range(12))
def test_matches_reference_on_random_batches(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    slots = 6
    slices = _fused(24, [16, 8, 8], slots, g)
    width = sum(int(s.weights.b_rows.shape[1]) for s in slices)
    # Segment sizes from 1 to ~40 tokens (decode-like and prefill-like mixed), some base-only tokens.
    lengths = torch.randint(0, 3, (slots,), generator=g).tolist()
    token_slots = [s for s in range(slots) for _ in range(lengths[s] if seed % 3 else lengths[s] * 17 + 1)]
    token_slots += [-1] * 3
    token_slots = [token_slots[int(i)] for i in torch.randperm(len(token_slots), generator=g)]
    batch = LoRABatch.from_slots(token_slots)
    x = torch.randn(len(token_slots), 24, generator=g)
    base = torch.randn(len(token_slots), width, generator=g)

    got = base.clone()
    apply_lora_torch(x, got, batch, slices, ChunkCache())
    want = _reference(x, base, batch, slices)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for t, slot in enumerate(token_slots):
        if slot < 0:
            assert torch.equal(got[t], base[t])  # base-only tokens are bit-identical


def test_long_segment_is_split_into_tiles_and_short_ones_padded() -> None:
    g = torch.Generator().manual_seed(1)
    slices = _fused(16, [12], 4, g)
    token_slots = [0] * 100 + [1, 2, 3] + [-1]
    batch = LoRABatch.from_slots(token_slots)
    plan = TilePlan.build(batch)
    assert plan.width < 100 and plan.tile_slots.count(0) > 1  # one 100-token segment -> several tiles
    assert plan.valid is not None
    x = torch.randn(len(token_slots), 16, generator=g)
    base = torch.zeros(len(token_slots), 12)
    got = base.clone()
    apply_lora_torch(x, got, batch, slices)
    torch.testing.assert_close(got, _reference(x, base, batch, slices), atol=1e-5, rtol=1e-5)


def test_cached_weights_follow_pool_writes() -> None:
    """Reloading a slot in place (what the pool does on evict + load) must never serve the old adapter."""
    g = torch.Generator().manual_seed(2)
    slices = _fused(16, [8, 8], 3, g)
    batch = LoRABatch.from_slots([0, 1, 2, 1, 0])
    x = torch.randn(5, 16, generator=g)
    cache = ChunkCache()
    first = torch.zeros(5, 16)
    apply_lora_torch(x, first, batch, slices, cache)

    w = slices[1].weights
    w.a_rows.mul_(-3.0)  # new weights in the same rows
    w.ranks[1] = 2  # and a new rank for slot 1
    w.scales[0] = 0.25
    got = torch.zeros(5, 16)
    apply_lora_torch(x, got, batch, slices, cache)
    torch.testing.assert_close(got, _reference(x, torch.zeros(5, 16), batch, slices), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, first)


def test_one_cache_serves_every_layer_and_changing_batches() -> None:
    g = torch.Generator().manual_seed(3)
    layers = [_fused(16, [8, 4], 4, g) for _ in range(3)]
    cache = ChunkCache()
    for step_slots in ([0, 1, 2, 3], [0, 1, 2, 3], [3, 3, -1, 0], [2] * 9):
        batch = LoRABatch.from_slots(step_slots)
        x = torch.randn(len(step_slots), 16, generator=g)
        for slices in layers:
            got = torch.zeros(len(step_slots), 12)
            apply_lora_torch(x, got, batch, slices, cache)
            want = _reference(x, torch.zeros(len(step_slots), 12), batch, slices)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_device_only_batch_and_untargeted_modules() -> None:
    """A batch without host segments (as the GPU path builds them) works; all-zero ranks leave out untouched."""
    g = torch.Generator().manual_seed(4)
    slices = _fused(16, [8], 3, g)
    host = LoRABatch.from_slots([2, 0, 0, 1])
    bare = LoRABatch(host.token_order, host.seg_start, host.seg_len, host.seg_slot)
    x = torch.randn(4, 16, generator=g)
    got = torch.zeros(4, 8)
    apply_lora_torch(x, got, bare, slices)
    torch.testing.assert_close(got, _reference(x, torch.zeros(4, 8), host, slices), atol=1e-5, rtol=1e-5)

    silent = [LoRASlice(_weights(16, 8, [0, 0, 0], g), 0)]
    out = torch.randn(4, 8, generator=g)
    before = out.clone()
    apply_lora_torch(x, out, host, silent)
    assert torch.equal(out, before)


def test_bfloat16_pool_and_activations() -> None:
    g = torch.Generator().manual_seed(5)
    slices = _fused(16, [8], 3, g)
    half = [
        LoRASlice(
            LoRAModuleWeights(
                s.weights.a_rows.bfloat16(),
                s.weights.b_rows.bfloat16(),
                s.weights.row_table,
                s.weights.ranks,
                s.weights.scales,
            ),
            s.out_offset,
        )
        for s in slices
    ]
    batch = LoRABatch.from_slots([0, 1, 2, 2])
    x = torch.randn(4, 16, generator=g).bfloat16()
    got = torch.zeros(4, 8, dtype=torch.bfloat16)
    apply_lora_torch(x, got, batch, half)
    want = _reference(x, torch.zeros(4, 8, dtype=torch.bfloat16), batch, half)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("layout", ["partial", "odd_widths", "strided_out"])
def test_scatter_into_any_output_layout(layout: str) -> None:
    """All slices are scattered in one index_add_ over rows of gcd(widths) columns: slices that cover only
    part of ``out``, widths with gcd 1, and a non-contiguous ``out`` must all still match the reference."""
    g = torch.Generator().manual_seed(6)
    outs = [7, 5, 3] if layout == "odd_widths" else [8, 4]
    slices = _fused(16, outs, 4, g)
    width = sum(outs)
    if layout == "partial":  # only the second slice, at its offset inside a wider output with a tail
        slices = slices[1:]
        width += 6
    batch = LoRABatch.from_slots([0, 1, 2, 3, 1, -1, 0, 3, 2])
    x = torch.randn(9, 16, generator=g)
    base = torch.randn(9, width, generator=g)
    got = base.clone()
    if layout == "strided_out":
        holder = torch.randn(width, 9, generator=g)
        holder.copy_(base.t())
        got = holder.t()  # [9, width] with transposed strides
        assert not got.is_contiguous()
    apply_lora_torch(x, got, batch, list(slices), ChunkCache())
    torch.testing.assert_close(got, _reference(x, base, batch, list(slices)), atol=1e-5, rtol=1e-5)


@st.composite
def segmentations(draw: st.DrawFn) -> tuple[list[int], list[tuple[int, int, int]], int]:
    """(token order, (slot, start, len) segments, token count): any grouping the kernels accept — several
    segments per slot, slots out of order, empty segments, base-model tokens in no segment."""
    num_tokens = draw(st.integers(1, 40))
    order = draw(st.permutations(range(num_tokens)))
    used = draw(st.integers(0, num_tokens))
    cuts = sorted(draw(st.lists(st.integers(0, used), max_size=6)))
    bounds = [0, *cuts, used]
    segments = [(draw(st.integers(0, 5)), a, b - a) for a, b in itertools.pairwise(bounds)]
    return list(order[:used]), segments, num_tokens


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(
    seg=segmentations(),
    ranks=st.lists(st.integers(1, 64), min_size=6, max_size=6),
    untargeted=st.sets(st.integers(0, 5), max_size=2),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    width=st.sampled_from([None, 1, 3, 16]),
    chunk=st.sampled_from([None, 4, 16, 64]),
    seed=st.integers(0, 2**16),
)
def test_random_segmentations_ranks_and_dtypes_match_reference(
    seg: tuple[list[int], list[tuple[int, int, int]], int],
    ranks: list[int],
    untargeted: set[int],
    dtype: torch.dtype,
    width: int | None,
    chunk: int | None,
    seed: int,
) -> None:
    order, segments, num_tokens = seg
    g = torch.Generator().manual_seed(seed)
    module_ranks = [0 if s in untargeted else r for s, r in enumerate(ranks)]
    slices = [
        LoRASlice(_cast(_weights(24, 16, module_ranks, g), dtype), 0),
        LoRASlice(_cast(_weights(24, 8, module_ranks[::-1], g), dtype), 16),
    ]
    batch = LoRABatch.from_segments(order, segments)
    x = torch.randn(num_tokens, 24, generator=g).to(dtype)
    base = torch.randn(num_tokens, 24, generator=g).to(dtype)
    got = base.clone()
    apply(x, got, slices, TilePlan.build(batch, width), ChunkCache(chunk))
    want = _reference(x, base, batch, slices)
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    touched = set(order)
    for t in range(num_tokens):
        if t not in touched:
            assert torch.equal(got[t], base[t])  # base-only tokens are bit-identical


def _cast(w: LoRAModuleWeights, dtype: torch.dtype) -> LoRAModuleWeights:
    return LoRAModuleWeights(w.a_rows.to(dtype), w.b_rows.to(dtype), w.row_table, w.ranks, w.scales)
