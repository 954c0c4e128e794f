"""Both LoRA backends, driven as the engine drives them (``prepare`` once, then ``apply``/``embedding``), equal
the reference at random step shapes — padded CUDA-graph buckets included — and never move their buffers.

The Triton backend runs natively on CUDA, else in Triton's interpreter (see conftest): shapes stay small.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="Triton is not installed; the Triton kernel tests need it")

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraplex.kernels import reference
from loraplex.kernels.lora import LoRABackend, make_backend
from loraplex.kernels.lora_step import LoRACapacity, LoRAStep
from loraplex.kernels.types import LoRABatch, LoRAModuleWeights, LoRASlice
from tests.kernels.builders import DEVICE, TOLERANCES, make_module

SLOTS = 6
MAX_RANK = 64
CAPACITY = LoRACapacity(max_tokens=48, max_logits=48, num_slots=SLOTS)
VOCAB = 40


@st.composite
def lora_steps(draw: st.DrawFn) -> LoRAStep:
    """Sequences with random slots (-1 = base), token counts (decode 1 .. prompt 12) and logits rows."""
    num = draw(st.integers(1, 8))
    slots = draw(st.lists(st.integers(-1, SLOTS - 1), min_size=num, max_size=num))
    tokens = draw(st.lists(st.integers(1, 12), min_size=num, max_size=num))
    logits = [draw(st.sampled_from([0, 1, n])) for n in tokens]
    pad = 0
    if all(n == 1 for n in tokens) and draw(st.booleans()):
        pad = draw(st.integers(num, 16))  # a decode bucket: padding sequences of the base model
        slots, tokens, logits = slots + [-1] * (pad - num), tokens + [1] * (pad - num), logits + [1] * (pad - num)
    return LoRAStep(slots, tokens, logits, pad)


def reference_apply(x: torch.Tensor, out: torch.Tensor, batch: LoRABatch, slices: list[LoRASlice]) -> torch.Tensor:
    want = out.clone()
    for s in slices:
        y = torch.zeros(x.shape[0], s.weights.max_rank, dtype=torch.float32, device=x.device)
        reference.lora_shrink_ref(x, batch, s.weights, y)
        reference.lora_expand_ref(y, batch, s.weights, want, s.out_offset)
    return want


def embedding_module(gen: torch.Generator, ranks: list[int], hidden: int, dtype: torch.dtype) -> LoRAModuleWeights:
    """embed_tokens' pool layout: a_rows [P, vocab] (A's rows), b_rows [P, hidden]."""
    return make_module(gen, ranks, MAX_RANK, VOCAB, hidden, dtype)


@pytest.mark.parametrize("name", ["torch", "triton"])
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(
    step=lora_steps(),
    ranks=st.lists(st.integers(0, MAX_RANK), min_size=SLOTS, max_size=SLOTS),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_backend_matches_reference_after_prepare(
    name: str, step: LoRAStep, ranks: list[int], dtype: torch.dtype, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    backend = make_backend(name, CAPACITY, DEVICE)
    tokens, logits = backend.prepare(step)
    num_tokens, num_rows = sum(step.seq_tokens), sum(step.seq_logits)
    slices = [
        LoRASlice(make_module(gen, ranks, MAX_RANK, 32, 24, dtype), 0),
        LoRASlice(make_module(gen, ranks[::-1], MAX_RANK, 32, 8, dtype), 24),
    ]
    atol, rtol = TOLERANCES[dtype]
    for batch, rows in ((tokens, num_tokens), (logits, num_rows)):
        x = torch.randn(rows, 32, generator=gen).to(dtype).to(DEVICE)
        out = torch.randn(rows, 32, generator=gen).to(dtype).to(DEVICE)
        want = reference_apply(x, out, batch, slices)
        backend.apply(x, out, slices, batch)
        torch.testing.assert_close(out.float(), want.float(), atol=atol, rtol=rtol)

    emb = embedding_module(gen, ranks, 16, dtype)
    ids = torch.randint(0, VOCAB, (num_tokens,), generator=gen).to(DEVICE)
    out = torch.randn(num_tokens, 16, generator=gen).to(dtype).to(DEVICE)
    want = out.clone()
    reference.lora_embedding_ref(ids, tokens, emb, want)
    backend.embedding(ids, emb, out, tokens)
    torch.testing.assert_close(out.float(), want.float(), atol=atol, rtol=rtol)


def pointers(backend: LoRABackend) -> set[int]:
    found = set()
    for batch in (backend.tokens, backend.logits):
        for t in (batch.token_order, batch.seg_start, batch.seg_len, batch.seg_slot, batch.token_slot):
            if t is not None and t.numel():
                found.add(t.data_ptr())
    return found


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_prepare_writes_in_place(name: str) -> None:
    backend = make_backend(name, CAPACITY, DEVICE)
    backend.prepare(LoRAStep([0, 3, -1, 3], [12, 1, 5, 1], [12, 1, 0, 1]))
    first = pointers(backend)
    for step in (
        LoRAStep([2, 2, 5], [1, 1, 1], [1, 1, 1]),
        LoRAStep([1, -1], [30, 1], [1, 1], 0),
        LoRAStep([4], [1], [1], pad_to=8),
    ):
        backend.prepare(step)
        assert pointers(backend) <= first


def test_capacity_errors_are_explicit() -> None:
    backend = make_backend("torch", CAPACITY, DEVICE)
    with pytest.raises(ValueError, match="preallocated"):
        backend.prepare(LoRAStep([0], [49], [1]))
