"""Triton paged prefill/mixed attention vs the torch reference: varlen, causal, sliding window, GQA."""

from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="Triton is not installed; the Triton kernel tests need it")

import torch
import triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraplex.kernels.reference import paged_attention_decode_ref, paged_attention_prefill_ref
from loraplex.kernels.triton_attention import paged_attention_decode
from loraplex.kernels.triton_prefill_attention import paged_attention_prefill
from tests.kernels.builders import DEVICE, make_paged_kv

ATOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@st.composite
def mixed_steps(draw: st.DrawFn) -> tuple[list[int], list[int]]:
    """(context lengths, new tokens per sequence): prompt chunks, whole prompts and decodes mixed."""
    lens = draw(st.lists(st.integers(1, 40), min_size=1, max_size=4))
    news = [draw(st.integers(1, length)) for length in lens]
    return lens, news


@settings(max_examples=14, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(
    step=mixed_steps(),
    n_kv=st.integers(1, 2),
    group=st.sampled_from([1, 2, 3, 4]),
    head_dim=st.sampled_from([8, 24, 32]),
    block_size=st.sampled_from([1, 4, 16]),
    window=st.sampled_from([None, 1, 5, 17]),
    config=st.sampled_from([None, triton.Config({"BLOCK_M": 32, "BLOCK_N": 16})]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_paged_prefill_matches_reference(
    step: tuple[list[int], list[int]],
    n_kv: int,
    group: int,
    head_dim: int,
    block_size: int,
    window: int | None,
    config: triton.Config | None,
    dtype: torch.dtype,
    seed: int,
) -> None:
    lens, news = step
    gen = torch.Generator().manual_seed(seed)
    k, v, tables, context = make_paged_kv(
        gen, lens, n_kv=n_kv, head_dim=head_dim, block_size=block_size, extra_blocks=1, dtype=dtype
    )
    starts = [sum(news[:b]) for b in range(len(news))]
    q = torch.randn(sum(news), n_kv * group, head_dim, generator=gen).to(dtype).to(DEVICE)

    def i32(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=DEVICE)

    scale = head_dim**-0.5
    out = paged_attention_prefill(q, k, v, tables, i32(starts), i32(news), context, scale, window, config=config)
    expected = paged_attention_prefill_ref(q, k, v, tables, i32(starts), i32(news), context, scale, window)
    torch.testing.assert_close(out.float(), expected.float(), atol=ATOL[dtype], rtol=1e-2)


def test_prefill_reference_agrees_with_decode_reference_on_single_tokens() -> None:
    """Both references mean the same thing where they overlap: one new token per sequence, with a window."""
    gen = torch.Generator().manual_seed(0)
    lens = [1, 9, 30]
    k, v, tables, context = make_paged_kv(
        gen, lens, n_kv=2, head_dim=16, block_size=4, extra_blocks=0, dtype=torch.float32
    )
    q = torch.randn(3, 4, 16, generator=gen).to(DEVICE)
    ones = torch.ones(3, dtype=torch.int32, device=DEVICE)
    starts = torch.arange(3, dtype=torch.int32, device=DEVICE)
    for window in (None, 4):
        prefill = paged_attention_prefill_ref(q, k, v, tables, starts, ones, context, 0.25, window)
        decode = paged_attention_decode_ref(q, k, v, tables, context, 0.25, window)
        torch.testing.assert_close(prefill, decode)


@pytest.mark.parametrize("window", [1, 3, 12])
@pytest.mark.parametrize("partition", [None, 8])
def test_paged_decode_with_sliding_window(window: int, partition: int | None) -> None:
    gen = torch.Generator().manual_seed(window)
    lens = [1, 5, 13, 30]
    k, v, tables, context = make_paged_kv(
        gen, lens, n_kv=2, head_dim=16, block_size=4, extra_blocks=1, dtype=torch.float32
    )
    q = torch.randn(len(lens), 4, 16, generator=gen).to(DEVICE)
    out = paged_attention_decode(q, k, v, tables, context, 0.25, partition_size=partition, window=window)
    expected = paged_attention_decode_ref(q, k, v, tables, context, 0.25, window)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_bad_inputs_are_rejected() -> None:
    gen = torch.Generator().manual_seed(1)
    k, v, tables, context = make_paged_kv(
        gen, [4], n_kv=1, head_dim=8, block_size=4, extra_blocks=0, dtype=torch.float32
    )
    q = torch.randn(4, 2, 8, generator=gen).to(DEVICE)
    one = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    four = torch.full((1,), 4, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="window"):
        paged_attention_prefill(q, k, v, tables, one, four, context, 1.0, window=0)
    with pytest.raises(ValueError, match="int32"):
        paged_attention_prefill(q, k, v, tables, one.long(), four, context, 1.0)
    with pytest.raises(ValueError, match="multiple"):
        paged_attention_prefill(
            torch.randn(4, 3, 8).to(DEVICE),
            k.expand(-1, -1, 2, -1),
            v.expand(-1, -1, 2, -1),
            tables,
            one,
            four,
            context,
            1.0,
        )
