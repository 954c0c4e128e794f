"""Builders for kernel test inputs: rank-exact pool modules, LoRA batches and paged KV caches.

Kept apart from the tests so the CPU (interpreted) and GPU modules build inputs the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from loraplex.kernels.types import LoRABatch, LoRAModuleWeights

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# (atol, rtol) per dtype for outputs of magnitude ~1.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 1e-2),
    torch.bfloat16: (8e-2, 2e-2),
}


def make_module(
    gen: torch.Generator,
    ranks: Sequence[int],
    max_rank: int,
    h_in: int,
    h_out: int,
    dtype: torch.dtype,
    device: torch.device = DEVICE,
) -> LoRAModuleWeights:
    """A pool module whose slots own ``ranks[s]`` scattered rank-rows (rank 0 = module not targeted).

    Rows are a random permutation, and row_table entries past a slot's rank point at *other* adapters' rows:
    a kernel that read past the rank would produce a visibly wrong result.
    """
    total = sum(ranks) + 3
    perm = torch.randperm(total, generator=gen)
    row_table = torch.randint(0, total, (len(ranks), max(1, max_rank)), generator=gen)
    pos = 0
    for s, r in enumerate(ranks):
        row_table[s, :r] = perm[pos : pos + r]
        pos += r
    a = torch.randn(total, h_in, generator=gen) / math.sqrt(h_in)
    b = torch.randn(total, h_out, generator=gen) / math.sqrt(max(1, max_rank))
    scales = torch.rand(len(ranks), generator=gen) + 0.5
    return LoRAModuleWeights(
        a_rows=a.to(dtype).to(device),
        b_rows=b.to(dtype).to(device),
        row_table=row_table.to(torch.int32).to(device),
        ranks=torch.tensor(list(ranks), dtype=torch.int32, device=device),
        scales=scales.to(device),
    )


def make_batch(
    token_slots: Sequence[int],
    *,
    grouped: bool,
    pad_slots: Sequence[int] = (),
    keep_host: bool = True,
    device: torch.device = DEVICE,
) -> LoRABatch:
    """Segments from a per-token slot list (-1 = no adapter).

    ``grouped``: one segment per slot (``LoRABatch.from_slots``); otherwise one segment per run of equal
    slots in token order, so a slot can own several segments and single-token segments are common (decode).
    ``pad_slots`` appends zero-length segments, as a fixed-shape CUDA buffer would hold. Without
    ``keep_host`` the host copy is dropped, as on CUDA.
    """
    if grouped:
        base = LoRABatch.from_slots(list(token_slots))
        order = base.token_order.tolist()
        segments = list(base.host_segments)
    else:
        order = [t for t, s in enumerate(token_slots) if s >= 0]
        segments = []
        for i, t in enumerate(order):
            slot = token_slots[t]
            if segments and segments[-1][0] == slot and i == segments[-1][1] + segments[-1][2]:
                segments[-1] = (slot, segments[-1][1], segments[-1][2] + 1)
            else:
                segments.append((slot, i, 1))
    segments += [(slot, len(order), 0) for slot in pad_slots]

    return LoRABatch.from_segments(order, segments, device, keep_host=keep_host)


def make_paged_kv(
    gen: torch.Generator,
    context_lens: Sequence[int],
    *,
    n_kv: int,
    head_dim: int,
    block_size: int,
    extra_blocks: int,
    dtype: torch.dtype,
    device: torch.device = DEVICE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(k_cache, v_cache, block_tables, context_lens) with each sequence's blocks scattered at random.

    Table entries past a sequence's length hold random (valid) block ids: they must be ignored.
    """
    need = [max(1, math.ceil(n / block_size)) for n in context_lens]
    max_blocks = max(need) + extra_blocks
    num_blocks = sum(need) + 2
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.randint(0, num_blocks, (len(context_lens), max_blocks), generator=gen)
    pos = 0
    for b, n in enumerate(need):
        tables[b, :n] = perm[pos : pos + n]
        pos += n
    shape = (num_blocks, block_size, n_kv, head_dim)
    k = torch.randn(shape, generator=gen).to(dtype).to(device)
    v = torch.randn(shape, generator=gen).to(dtype).to(device)
    lens = torch.tensor(list(context_lens), dtype=torch.int32, device=device)
    return k, v, tables.to(torch.int32).to(device), lens
