"""Native Triton kernels at Llama-3-8B shapes (ranks 8..128), incl. CUDA-graph capture; skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (native Triton kernels at Llama-3-8B shapes)", allow_module_level=True)
pytest.importorskip("triton", reason="Triton is not installed")

from loraplex.kernels import reference
from loraplex.kernels import triton_lora as tlora
from loraplex.kernels.triton_attention import paged_attention_decode
from loraplex.kernels.types import LoRABatch, LoRASlice
from tests.kernels.builders import make_batch, make_module, make_paged_kv

HIDDEN, KV, FFN = 4096, 1024, 14336
RANKS = [8, 16, 32, 64, 128, 0, 24, 128, 8, 64, 16, 32]  # slot 5 does not target the module
MAX_RANK = 128
TOL = {torch.bfloat16: (6e-2, 2e-2), torch.float16: (2e-2, 1e-2)}
DEVICE = torch.device("cuda")


def _reference(x: torch.Tensor, out: torch.Tensor, batch: LoRABatch, slices: list[LoRASlice]) -> torch.Tensor:
    expected = out.clone()
    for s in slices:
        y = torch.zeros(x.shape[0], s.weights.max_rank, dtype=torch.float32, device=x.device)
        reference.lora_shrink_ref(x, batch, s.weights, y)
        reference.lora_expand_ref(y, batch, s.weights, expected, s.out_offset)
    return expected


def _decode_slots(gen: torch.Generator, num_tokens: int) -> list[int]:
    return torch.randint(-1, len(RANKS), (num_tokens,), generator=gen).tolist()


def _prefill_slots(lengths: list[int], slots: list[int]) -> list[int]:
    return [slot for length, slot in zip(lengths, slots, strict=True) for _ in range(length)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape",
    [("qkv", HIDDEN, [HIDDEN, KV, KV]), ("gate_up", HIDDEN, [FFN, FFN]), ("down", FFN, [HIDDEN])],
    ids=lambda s: s[0],
)
@pytest.mark.parametrize("regime", ["decode", "prefill"])
def test_llama3_8b_shapes_match_reference(dtype: torch.dtype, shape: tuple[str, int, list[int]], regime: str) -> None:
    _, h_in, h_outs = shape
    gen = torch.Generator().manual_seed(0)
    slices, offset = [], 0
    for h_out in h_outs:
        slices.append(LoRASlice(make_module(gen, RANKS, MAX_RANK, h_in, h_out, dtype, DEVICE), offset))
        offset += h_out
    if regime == "decode":
        token_slots = _decode_slots(gen, 96)
        batch = make_batch(token_slots, grouped=False, pad_slots=[0, 3], keep_host=False, device=DEVICE)
    else:
        token_slots = _prefill_slots([300, 1, 57, 129, 40], [4, 0, -1, 7, 5])
        batch = make_batch(token_slots, grouped=True, keep_host=False, device=DEVICE)
    x = torch.randn(len(token_slots), h_in, generator=gen).to(dtype).to(DEVICE)
    before = torch.randn(len(token_slots), offset, generator=gen).to(dtype).to(DEVICE)
    out = before.clone()
    tlora.apply_lora(x, out, batch, slices)
    expected = _reference(x, before, batch, slices)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.float(), expected.float(), atol=atol, rtol=rtol)
    untouched = torch.tensor([s < 0 or RANKS[s] == 0 for s in token_slots], device=DEVICE)
    assert torch.equal(out[untouched], before[untouched])


def test_apply_lora_replays_in_a_cuda_graph_with_new_batch_contents() -> None:
    """Capture once, then change segments/slots/inputs in place (same shapes) and replay."""
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(1)
    slices = [
        LoRASlice(make_module(gen, RANKS, MAX_RANK, HIDDEN, HIDDEN, dtype, DEVICE), 0),
        LoRASlice(make_module(gen, RANKS, MAX_RANK, HIDDEN, KV, dtype, DEVICE), HIDDEN),
    ]
    num_tokens, width = 64, HIDDEN + KV
    first = make_batch(list(range(len(RANKS))) * 5 + [0] * 4, grouped=True, keep_host=False, device=DEVICE)
    static_batch = LoRABatch(
        first.token_order.clone(), first.seg_start.clone(), first.seg_len.clone(), first.seg_slot.clone()
    )
    x = torch.randn(num_tokens, HIDDEN, generator=gen).to(dtype).to(DEVICE)
    base = torch.randn(num_tokens, width, generator=gen).to(dtype).to(DEVICE)
    out = base.clone()
    tlora.apply_lora(x, out, static_batch, slices)  # warm-up: autotune + pointer tables outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tlora.apply_lora(x, out, static_batch, slices)

    # Same number of LoRA tokens and segments, different grouping, slots and inputs.
    second_slots = [3] * 20 + [11] * 30 + [7] * 14
    second = make_batch(second_slots, grouped=True, pad_slots=[0] * 9, keep_host=False, device=DEVICE)
    assert second.seg_slot.shape == static_batch.seg_slot.shape
    for dst, src in zip(
        (static_batch.token_order, static_batch.seg_start, static_batch.seg_len, static_batch.seg_slot),
        (second.token_order, second.seg_start, second.seg_len, second.seg_slot),
        strict=True,
    ):
        dst.copy_(src)
    x.copy_(torch.randn(num_tokens, HIDDEN, generator=gen).to(dtype))
    out.copy_(base)
    graph.replay()
    torch.cuda.synchronize()
    expected = _reference(x, base, second, slices)
    torch.testing.assert_close(out.float(), expected.float(), atol=6e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("partition", [None, 256])
def test_paged_decode_llama3_8b_heads(dtype: torch.dtype, partition: int | None) -> None:
    gen = torch.Generator().manual_seed(2)
    lens = [1, 17, 512, 513, 2047, 3000, 64, 1000]
    k, v, tables, context = make_paged_kv(
        gen, lens, n_kv=8, head_dim=128, block_size=16, extra_blocks=3, dtype=dtype, device=DEVICE
    )
    q = torch.randn(len(lens), 32, 128, generator=gen).to(dtype).to(DEVICE)
    out = paged_attention_decode(q, k, v, tables, context, 128**-0.5, partition_size=partition)
    expected = reference.paged_attention_decode_ref(q, k, v, tables, context, 128**-0.5)
    atol = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.float(), expected.float(), atol=atol, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", [None, 4096, 100])
def test_paged_prefill_llama3_8b_heads(dtype: torch.dtype, window: int | None) -> None:
    """A mixed step (long prompt chunk, whole prompts, decodes) at Llama-3-8B heads vs the reference."""
    from loraplex.kernels.reference import paged_attention_prefill_ref
    from loraplex.kernels.triton_prefill_attention import paged_attention_prefill

    gen = torch.Generator().manual_seed(3)
    lens = [700, 1, 130, 513, 64, 2000]
    news = [300, 1, 130, 1, 17, 1]
    k, v, tables, context = make_paged_kv(
        gen, lens, n_kv=8, head_dim=128, block_size=16, extra_blocks=2, dtype=dtype, device=DEVICE
    )
    starts = torch.tensor([sum(news[:b]) for b in range(len(news))], dtype=torch.int32, device=DEVICE)
    q_len = torch.tensor(news, dtype=torch.int32, device=DEVICE)
    q = torch.randn(sum(news), 32, 128, generator=gen).to(dtype).to(DEVICE)
    out = paged_attention_prefill(q, k, v, tables, starts, q_len, context, 128**-0.5, window)
    expected = paged_attention_prefill_ref(q, k, v, tables, starts, q_len, context, 128**-0.5, window)
    atol = {torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.float(), expected.float(), atol=atol, rtol=1e-2)
