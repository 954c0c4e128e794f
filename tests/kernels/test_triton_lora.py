"""Triton LoRA shrink/expand/apply vs the torch reference, on Hypothesis-generated batches and pools.

Interpreted on CPU (slow), so shapes are tiny and examples few; every example still mixes ranks 1..64, empty
and single-token segments, slots without the module (rank 0), permuted pool rows and several slices.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

pytest.importorskip("triton", reason="Triton is not installed; the Triton kernel tests need it")

import torch
import triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraplex.kernels import lora as lora_api
from loraplex.kernels import reference
from loraplex.kernels import triton_lora as tlora
from loraplex.kernels.lora_step import LoRACapacity
from loraplex.kernels.triton_lora_meta import SlicePlan, meta_table
from loraplex.kernels.types import LoRABatch, LoRAModuleWeights, LoRASlice
from tests.kernels.builders import DEVICE, TOLERANCES, make_batch, make_module

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Explicit configs exercise what the single interpreted default cannot: store vs atomic split-K, a split count
# that does not divide K, several K iterations, several rank and output tiles.
SHRINK_CONFIGS = [
    None,
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 1}),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "SPLIT_K": 3}),
]
EXPAND_CONFIGS = [
    None,
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}),
]
FEW = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@dataclass(frozen=True)
class LoraCase:
    """One generated scenario: pool shape, per-token slots (-1 = no adapter), segment layout, dtype."""

    ranks: list[int]
    max_rank: int
    h_in: int
    h_outs: list[int]
    gaps: list[int]
    token_slots: list[int]
    grouped: bool
    pad_slots: list[int]
    keep_host: bool
    dtype: torch.dtype
    seed: int

    @property
    def num_tokens(self) -> int:
        return len(self.token_slots)

    def setup(self) -> tuple[torch.Generator, LoRABatch]:
        gen = torch.Generator().manual_seed(self.seed)
        batch = make_batch(self.token_slots, grouped=self.grouped, pad_slots=self.pad_slots, keep_host=self.keep_host)
        return gen, batch

    def module(self, gen: torch.Generator, h_out: int) -> LoRAModuleWeights:
        return make_module(gen, self.ranks, self.max_rank, self.h_in, h_out, self.dtype)

    def inputs(self, gen: torch.Generator) -> torch.Tensor:
        return torch.randn(self.num_tokens, self.h_in, generator=gen).to(self.dtype).to(DEVICE)


@st.composite
def lora_cases(draw: st.DrawFn) -> LoraCase:
    """A pool (one module per slice) plus a batch; ranks 0..64 mixed, tokens with and without adapters."""
    num_slots = draw(st.integers(1, 4))
    max_rank = draw(st.sampled_from([1, 8, 24, 64]))
    num_tokens = draw(st.integers(1, 20))
    h_outs = draw(st.lists(st.integers(1, 40), min_size=1, max_size=3))
    return LoraCase(
        ranks=draw(st.lists(st.integers(0, max_rank), min_size=num_slots, max_size=num_slots)),
        max_rank=max_rank,
        h_in=draw(st.integers(1, 48)),
        h_outs=h_outs,
        gaps=draw(st.lists(st.integers(0, 3), min_size=len(h_outs) + 1, max_size=len(h_outs) + 1)),
        token_slots=draw(st.lists(st.integers(-1, num_slots - 1), min_size=num_tokens, max_size=num_tokens)),
        grouped=draw(st.booleans()),
        pad_slots=draw(st.lists(st.integers(0, num_slots - 1), max_size=2)),
        keep_host=draw(st.booleans()),
        dtype=draw(st.sampled_from(DTYPES)),
        seed=draw(st.integers(0, 2**16)),
    )


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, *dtypes: torch.dtype) -> None:
    atol = max(TOLERANCES[d][0] for d in dtypes)
    rtol = max(TOLERANCES[d][1] for d in dtypes)
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol, equal_nan=True)


@FEW
@given(
    case=lora_cases(),
    shrink_cfg=st.sampled_from(SHRINK_CONFIGS),
    expand_cfg=st.sampled_from(EXPAND_CONFIGS),
)
def test_apply_lora_matches_reference_and_leaves_the_rest_bit_identical(
    case: LoraCase, shrink_cfg: triton.Config | None, expand_cfg: triton.Config | None
) -> None:
    gen, batch = case.setup()
    dtype = case.dtype
    slices, offset = [], case.gaps[0]
    for h_out, gap in zip(case.h_outs, case.gaps[1:], strict=True):
        slices.append(LoRASlice(case.module(gen, h_out), offset))
        offset += h_out + gap
    x = case.inputs(gen)
    before = torch.randn(x.shape[0], offset, generator=gen).to(dtype).to(DEVICE)

    out = before.clone()
    tlora.apply_lora(x, out, batch, slices, shrink_config=shrink_cfg, expand_config=expand_cfg)

    expected = before.clone()
    for s in slices:
        y = torch.zeros(x.shape[0], s.weights.max_rank, dtype=torch.float32, device=DEVICE)
        reference.lora_shrink_ref(x, batch, s.weights, y)
        reference.lora_expand_ref(y, batch, s.weights, expected, s.out_offset)
    _assert_close(out, expected, dtype)

    # Untouched means bit-identical: tokens without an adapter, gap columns, slices the slot does not target.
    touched = torch.zeros_like(out, dtype=torch.bool)
    for t, slot in enumerate(case.token_slots):
        if slot >= 0 and case.ranks[slot] > 0:
            for s in slices:
                touched[t, s.out_offset : s.out_offset + s.weights.b_rows.shape[1]] = True
    assert torch.equal(out[~touched], before[~touched])


@FEW
@given(case=lora_cases(), cfg=st.sampled_from(SHRINK_CONFIGS), y_dtype=st.sampled_from(DTYPES))
def test_shrink_writes_exactly_each_tokens_rank_columns(
    case: LoraCase, cfg: triton.Config | None, y_dtype: torch.dtype
) -> None:
    gen, batch = case.setup()
    w = case.module(gen, 8)
    x = case.inputs(gen)
    y = torch.full((x.shape[0], w.max_rank + 2), float("nan"), dtype=y_dtype, device=DEVICE)
    expected = y.clone()
    tlora.lora_shrink(x, batch, w, y, config=cfg)
    reference.lora_shrink_ref(x, batch, w, expected)
    _assert_close(y, expected, case.dtype, y_dtype)
    assert torch.equal(y.isnan(), expected.isnan())  # nothing written outside [T_g, :r]


@FEW
@given(case=lora_cases(), cfg=st.sampled_from(EXPAND_CONFIGS), offset=st.integers(0, 5))
def test_expand_reads_only_each_tokens_rank_columns(case: LoraCase, cfg: triton.Config | None, offset: int) -> None:
    gen, batch = case.setup()
    dtype, h_out, num_tokens = case.dtype, case.h_outs[0], case.num_tokens
    w = case.module(gen, h_out)
    # y holds real values only in each token's own [:r]; NaN elsewhere would poison any read past the rank.
    y = torch.full((num_tokens, w.max_rank), float("nan"))
    for t, slot in enumerate(case.token_slots):
        if slot >= 0:
            y[t, : case.ranks[slot]] = torch.randn(case.ranks[slot], generator=gen)
    y = y.to(DEVICE)
    before = torch.randn(num_tokens, offset + h_out + 2, generator=gen).to(dtype).to(DEVICE)
    out, expected = before.clone(), before.clone()
    tlora.lora_expand(y, batch, w, out, offset, config=cfg)
    reference.lora_expand_ref(y, batch, w, expected, offset)
    _assert_close(out, expected, dtype)
    assert not out.isnan().any()


def test_backend_objects_agree_and_auto_picks_by_device() -> None:
    gen = torch.Generator().manual_seed(3)
    token_slots = [1, -1, 0, 1, 1, 2, -1, 0]
    batch = make_batch(token_slots, grouped=True)
    q = make_module(gen, [4, 16, 0], 16, 32, 24, torch.float32)
    v = make_module(gen, [2, 0, 9], 16, 32, 8, torch.float32)
    x = torch.randn(len(token_slots), 32, generator=gen).to(DEVICE)
    before = torch.randn(len(token_slots), 32, generator=gen).to(DEVICE)
    slices = [LoRASlice(q, 0), LoRASlice(v, 24)]
    capacity = LoRACapacity(max_tokens=16, max_logits=16, num_slots=3)
    on_torch = lora_api.make_backend("torch", capacity, DEVICE)
    on_triton = lora_api.make_backend("triton", capacity, DEVICE)
    assert isinstance(on_torch, lora_api.TorchLoRABackend) and isinstance(on_triton, lora_api.TritonLoRABackend)
    expected, out = before.clone(), before.clone()
    on_torch.apply(x, expected, slices, batch)
    on_triton.apply(x, out, slices, batch)
    _assert_close(out, expected, torch.float32)
    auto = lora_api.make_backend("auto", capacity, DEVICE)
    assert auto.name == ("triton" if DEVICE.type == "cuda" else "torch")
    with pytest.raises(ValueError, match="one of"):
        lora_api.make_backend("cuda", capacity, DEVICE)


def test_empty_batch_and_no_slices_are_no_ops() -> None:
    gen = torch.Generator().manual_seed(0)
    w = make_module(gen, [4], 4, 16, 16, torch.float32)
    x = torch.randn(3, 16).to(DEVICE)
    out = torch.randn(3, 16).to(DEVICE)
    before = out.clone()
    tlora.apply_lora(x, out, make_batch([-1, -1, -1], grouped=True), [LoRASlice(w, 0)])
    tlora.apply_lora(x, out, make_batch([0, 0, 0], grouped=True), [])
    assert torch.equal(out, before)


def test_invalid_inputs_raise_explicit_errors() -> None:
    gen = torch.Generator().manual_seed(0)
    w = make_module(gen, [4, 2], 4, 16, 8, torch.float32)
    batch = make_batch([0, 1], grouped=True)
    x = torch.randn(2, 16).to(DEVICE)
    out = torch.zeros(2, 16).to(DEVICE)
    with pytest.raises(ValueError, match="disjoint"):
        tlora.apply_lora(x, out, batch, [LoRASlice(w, 0), LoRASlice(w, 4)])
    with pytest.raises(ValueError, match="exceed"):
        tlora.apply_lora(x, out, batch, [LoRASlice(w, 10)])
    with pytest.raises(ValueError, match="width"):
        tlora.apply_lora(torch.randn(2, 12).to(DEVICE), out, batch, [LoRASlice(w, 0)])
    wide_table = LoRAModuleWeights(w.a_rows, w.b_rows, w.row_table.long(), w.ranks, w.scales)
    with pytest.raises(ValueError, match="row_table"):
        tlora.apply_lora(x, out, batch, [LoRASlice(wide_table, 0)])
    with pytest.raises(TypeError, match="float16, bfloat16 and float32"):
        as_int = LoRAModuleWeights(w.a_rows.to(torch.int8), w.b_rows.to(torch.int8), w.row_table, w.ranks, w.scales)
        tlora.apply_lora(x, out, batch, [LoRASlice(as_int, 0)])
    bad_batch = LoRABatch(batch.token_order.long(), batch.seg_start, batch.seg_len, batch.seg_slot)
    with pytest.raises(ValueError, match="token_order"):
        tlora.apply_lora(x, out, bad_batch, [LoRASlice(w, 0)])
    with pytest.raises(ValueError, match="max rank"):
        tlora.lora_shrink(x, batch, w, torch.zeros(2, 2).to(DEVICE))


def test_slice_table_is_memoised_on_addresses_and_offsets() -> None:
    gen = torch.Generator().manual_seed(0)
    w = make_module(gen, [4], 4, 16, 8, torch.float32)
    first = meta_table([SlicePlan(w, 0, 0)], DEVICE)
    assert meta_table([SlicePlan(w, 0, 0)], DEVICE) is first  # no host-to-device copy on the hot path
    moved = meta_table([SlicePlan(w, 8, 0)], DEVICE)
    assert moved is not first
    assert int(moved[0, 9]) == 8
