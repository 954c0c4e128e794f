"""Triton paged decode attention vs the torch reference: GQA, random block tables, split-KV partitions."""

from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="Triton is not installed; the Triton kernel tests need it")

import torch
import triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraplex.kernels.reference import paged_attention_decode_ref
from loraplex.kernels.triton_attention import paged_attention_decode
from tests.kernels.builders import DEVICE, make_paged_kv

ATOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(
    context_lens=st.lists(st.integers(0, 40), min_size=1, max_size=4),
    n_kv=st.integers(1, 2),
    group=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([8, 24, 32]),
    block_size=st.sampled_from([1, 4, 16]),
    extra_blocks=st.integers(0, 2),
    partition=st.sampled_from([None, 8, 16, 24]),
    block_n=st.sampled_from([None, 16, 32]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_paged_decode_matches_reference(
    context_lens: list[int],
    n_kv: int,
    group: int,
    head_dim: int,
    block_size: int,
    extra_blocks: int,
    partition: int | None,
    block_n: int | None,
    dtype: torch.dtype,
    seed: int,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    k, v, tables, lens = make_paged_kv(
        gen,
        context_lens,
        n_kv=n_kv,
        head_dim=head_dim,
        block_size=block_size,
        extra_blocks=extra_blocks,
        dtype=dtype,
    )
    q = torch.randn(len(context_lens), n_kv * group, head_dim, generator=gen).to(dtype).to(DEVICE)
    scale = head_dim**-0.5
    config = None if block_n is None else triton.Config({"BLOCK_N": block_n})
    out = paged_attention_decode(q, k, v, tables, lens, scale, partition_size=partition, config=config)
    expected = paged_attention_decode_ref(q, k, v, tables, lens, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), expected.float(), atol=ATOL[dtype], rtol=1e-2)


def test_non_contiguous_query_and_long_history_across_many_partitions() -> None:
    gen = torch.Generator().manual_seed(1)
    k, v, tables, lens = make_paged_kv(
        gen, [150, 3, 97], n_kv=2, head_dim=16, block_size=8, extra_blocks=1, dtype=torch.float32
    )
    qkv = torch.randn(3, 3 * 4, 16, generator=gen).to(DEVICE)
    q = qkv[:, :4]  # a view into a fused qkv buffer: head and batch strides differ from a packed tensor
    out = paged_attention_decode(q, k, v, tables, lens, 0.25, partition_size=16)
    expected = paged_attention_decode_ref(q, k, v, tables, lens, 0.25)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_invalid_shapes_raise_explicit_errors() -> None:
    gen = torch.Generator().manual_seed(0)
    k, v, tables, lens = make_paged_kv(gen, [5], n_kv=2, head_dim=8, block_size=4, extra_blocks=0, dtype=torch.float32)
    with pytest.raises(ValueError, match="multiple"):
        paged_attention_decode(torch.randn(1, 3, 8).to(DEVICE), k, v, tables, lens, 1.0)
    with pytest.raises(ValueError, match="block_tables"):
        paged_attention_decode(torch.randn(1, 4, 8).to(DEVICE), k, v, tables.long(), lens, 1.0)
    with pytest.raises(TypeError, match="dtype"):
        paged_attention_decode(torch.randn(1, 4, 8).to(DEVICE).half(), k, v, tables, lens, 1.0)
    with pytest.raises(ValueError, match="partition_size"):
        paged_attention_decode(torch.randn(1, 4, 8).to(DEVICE), k, v, tables, lens, 1.0, partition_size=0)
