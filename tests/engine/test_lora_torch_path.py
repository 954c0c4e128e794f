"""The torch backend (``TorchLoRABackend``) equals the reference shrink+expand, fragmented pools included."""

from __future__ import annotations

import torch

from loraplex.kernels import reference
from loraplex.kernels.lora import make_backend
from loraplex.kernels.lora_step import LoRACapacity
from loraplex.kernels.types import LoRABatch, LoRAModuleWeights, LoRASlice


def _weights(h_in: int, h_out: int, ranks: list[int], rows: int, g: torch.Generator) -> LoRAModuleWeights:
    slots, max_rank = len(ranks), 8
    perm = torch.randperm(rows, generator=g).tolist()  # scattered rows: exercises the gather branch
    table = torch.zeros(slots, max_rank, dtype=torch.int32)
    taken = 0
    for s, r in enumerate(ranks):
        chosen = list(range(taken, taken + r)) if s % 2 else perm[taken : taken + r]
        table[s, :r] = torch.tensor(chosen, dtype=torch.int32)
        taken += r
    return LoRAModuleWeights(
        a_rows=torch.randn(rows, h_in, generator=g),
        b_rows=torch.randn(rows, h_out, generator=g),
        row_table=table,
        ranks=torch.tensor(ranks, dtype=torch.int32),
        scales=torch.rand(slots, generator=g) + 0.5,
    )


def test_fast_path_matches_reference() -> None:
    g = torch.Generator().manual_seed(0)
    h_in = 16
    slices = [
        LoRASlice(_weights(h_in, 12, [3, 0, 8, 5], 40, g), 0),
        LoRASlice(_weights(h_in, 6, [2, 4, 0, 1], 40, g), 12),
    ]
    token_slots = [2, -1, 0, 2, 3, 1, -1, 0, 3, 3]
    batch = LoRABatch.from_slots(token_slots)
    x = torch.randn(len(token_slots), h_in, generator=g)
    base = torch.randn(len(token_slots), 18, generator=g)

    got = base.clone()
    backend = make_backend("torch", LoRACapacity(16, 16, 4), torch.device("cpu"))
    backend.apply(x, got, slices, batch)
    want = base.clone()
    for s in slices:
        y = torch.zeros(x.shape[0], s.weights.max_rank)
        reference.lora_shrink_ref(x, batch, s.weights, y)
        reference.lora_expand_ref(y, batch, s.weights, want, s.out_offset)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[1], base[1]) and torch.equal(got[6], base[6])  # base-only tokens untouched
