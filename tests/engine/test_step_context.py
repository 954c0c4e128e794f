"""The step context and LoRA grouping: the same values as a from-scratch build, in buffers that never move.

Why: every layer reads the ``Context`` and the backend's ``LoRABatch`` views; they are rewritten in place each
step (so CUDA graphs can replay them), which must neither change what a step computes nor reallocate.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraplex.engine.context import Context, ContextBuilder, ContextCapacity, SeqSlice
from loraplex.kernels.lora import make_backend
from loraplex.kernels.lora_step import LoRACapacity
from loraplex.kernels.types import LoRABatch

BLOCK = 4
CAP = ContextCapacity(max_tokens=64, max_seqs=8, max_blocks=12)
SLOTS = 5
CPU = torch.device("cpu")


def builder(triton: bool = False) -> ContextBuilder:
    backend = make_backend("torch", LoRACapacity(CAP.max_tokens, CAP.max_tokens, SLOTS), CPU)
    return ContextBuilder(CAP, BLOCK, CPU, backend, triton=triton, scratch_block=99)


@st.composite
def steps(draw: st.DrawFn) -> list[SeqSlice]:
    """Random mixed steps: decodes, prompt chunks, whole prompts; any slots; any logits-row counts."""
    slices: list[SeqSlice] = []
    budget = CAP.max_tokens
    next_block = 0
    for _ in range(draw(st.integers(1, CAP.max_seqs))):
        n = draw(st.integers(1, max(1, min(budget, 12))))
        if n > budget:
            break
        budget -= n
        start = draw(st.integers(0, CAP.max_blocks * BLOCK - n))
        blocks = list(range(next_block, next_block + math.ceil((start + n) / BLOCK)))
        next_block += len(blocks)
        slices.append(
            SeqSlice(
                token_ids=draw(st.lists(st.integers(0, 300), min_size=n, max_size=n)),
                start_pos=start,
                block_table=blocks,
                slot=draw(st.integers(-1, SLOTS - 1)),
                num_logits=draw(st.sampled_from([0, 1, n])),
            )
        )
    return slices


def expected(slices: list[SeqSlice]) -> dict[str, list[int]]:
    """What the step means, computed token by token."""
    out: dict[str, list[int]] = {k: [] for k in ("ids", "pos", "slot_mapping", "logits", "logits_seqs")}
    token_slots: list[int] = []
    logits_slots: list[int] = []
    t = 0
    for b, s in enumerate(slices):
        for i, token in enumerate(s.token_ids):
            p = s.start_pos + i
            out["ids"].append(token)
            out["pos"].append(p)
            out["slot_mapping"].append(s.block_table[p // BLOCK] * BLOCK + p % BLOCK)
            token_slots.append(s.slot)
            if i >= len(s.token_ids) - s.num_logits:
                out["logits"].append(t)
                out["logits_seqs"].append(b)
                logits_slots.append(s.slot)
            t += 1
    out["token_slots"], out["logits_slots"] = token_slots, logits_slots
    return out


def grouping(batch: LoRABatch) -> dict[int, list[int]]:
    """slot -> its rows, read back from the device tensors."""
    found: dict[int, list[int]] = {}
    order = batch.token_order.tolist()
    for slot, start, length in zip(
        batch.seg_slot.tolist(), batch.seg_start.tolist(), batch.seg_len.tolist(), strict=True
    ):
        found.setdefault(slot, []).extend(order[start : start + length])
    return {slot: rows for slot, rows in found.items() if rows}


def by_slot(slots: list[int]) -> dict[int, list[int]]:
    found: dict[int, list[int]] = {}
    for row, slot in enumerate(slots):
        if slot >= 0:
            found.setdefault(slot, []).append(row)
    return found


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(step=steps())
def test_context_means_what_the_slices_say(step: list[SeqSlice]) -> None:
    ctx = builder().build(step)
    want = expected(step)
    assert ctx.input_ids.tolist() == want["ids"]
    assert ctx.positions.tolist() == want["pos"]
    assert ctx.slot_mapping.tolist() == want["slot_mapping"]
    assert ctx.logits_indices.tolist() == want["logits"]
    assert ctx.logits_seqs == want["logits_seqs"]
    assert ctx.kv_len.tolist() == [s.start_pos + len(s.token_ids) for s in step]
    assert ctx.decode_only == all(len(s.token_ids) == 1 for s in step)
    assert grouping(ctx.lora) == by_slot(want["token_slots"])
    assert grouping(ctx.lora_logits) == by_slot(want["logits_slots"])
    assert ctx.lora.token_slot is not None and ctx.lora.token_slot.tolist() == want["token_slots"]
    # The padded grid of the torch attention path: every token sits in its sequence's row at its offset.
    grid = ctx.grid
    assert grid is not None
    cells = grid.q_cells.tolist()
    qmax = grid.q_index.shape[1]
    for t, cell in enumerate(cells):
        b, i = divmod(cell, qmax)
        assert grid.q_index[b, i] == t and grid.q_pos[b, i] == want["pos"][t]
    for b, s in enumerate(step):
        length = s.start_pos + len(s.token_ids)
        keys = [s.block_table[j // BLOCK] * BLOCK + j % BLOCK for j in range(length)]
        assert grid.kv_index[b, :length].tolist() == keys


def addresses(ctx: Context) -> dict[str, int]:
    tensors = {
        "input_ids": ctx.input_ids,
        "positions": ctx.positions,
        "slot_mapping": ctx.slot_mapping,
        "q_start": ctx.q_start,
        "kv_len": ctx.kv_len,
        "block_tables": ctx.block_tables,
        "logits_indices": ctx.logits_indices,
        "token_order": ctx.lora.token_order,
        "seg_start": ctx.lora.seg_start,
        "seg_slot": ctx.lora.seg_slot,
        "logits_order": ctx.lora_logits.token_order,
    }
    if ctx.grid is not None:
        tensors.update(q_index=ctx.grid.q_index, kv_index=ctx.grid.kv_index, q_cells=ctx.grid.q_cells)
    return {name: t.data_ptr() for name, t in tensors.items() if t.numel()}  # empty views report address 0


def test_buffers_stay_put_across_steps_of_every_shape() -> None:
    build = builder()
    shapes = [
        [SeqSlice(list(range(30)), 0, list(range(8)), 1, 1)],  # one prompt
        [SeqSlice([5], 30, list(range(8)), 1, 1), SeqSlice(list(range(9)), 0, [8, 9, 10], 0, 9)],  # mixed
        [SeqSlice([5], 31, list(range(8)), 1, 1), SeqSlice([6], 9, [8, 9, 10], 2, 1)],  # decode
        [SeqSlice([7], 3, [20], -1, 0)],  # base model, no logits
    ]
    seen = [addresses(build.build(step)) for step in shapes]
    assert all(found.items() <= seen[0].items() for found in seen[1:])
    assert len(seen[1]) == len(seen[0])  # the mixed step uses every buffer the prompt step did
    triton_layout = builder(triton=True)
    first = addresses(triton_layout.build(shapes[0]))
    assert all(addresses(triton_layout.build(step)).items() <= first.items() for step in shapes[1:])
    assert triton_layout.build(shapes[0]).grid is None  # the Triton layout keeps no padded grid


def test_padded_bucket_fills_scratch_sequences_and_fixed_shapes() -> None:
    step = [SeqSlice([5], 9, [3, 4, 7], 2, 1), SeqSlice([6], 0, [1], -1, 1)]
    ctx = builder(triton=True).build(step, pad_to=4)
    assert ctx.input_ids.tolist() == [5, 6, 0, 0]
    assert ctx.slot_mapping.tolist() == [7 * BLOCK + 1, 1 * BLOCK, 99 * BLOCK, 99 * BLOCK]
    assert ctx.block_tables.shape == (4, CAP.max_blocks)
    assert ctx.block_tables[2:, 0].tolist() == [99, 99]
    assert ctx.kv_len.tolist() == [10, 1, 1, 1]
    assert ctx.logits_indices.tolist() == [0, 1, 2, 3] and ctx.logits_seqs == [0, 1]
    assert ctx.lora.token_order.shape == (4,) and ctx.lora.seg_slot.shape == (4,)  # min(bucket, slots) segments
    assert grouping(ctx.lora) == {2: [0]}
    assert ctx.lora.seg_len.tolist()[1:] == [0, 0, 0]


def test_capacity_is_enforced_with_a_clear_error() -> None:
    build = builder()
    with pytest.raises(ValueError, match="preallocated"):
        build.build([SeqSlice([1] * 65, 0, list(range(17)), -1, 1)])
    with pytest.raises(ValueError, match="preallocated"):
        build.build([SeqSlice([1], 0, [0], -1, 1)] * 9)
