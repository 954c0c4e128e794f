"""The paged KV cache: preallocated per-layer block tensors and the block manager that hands blocks out.

Why paged: sequences grow one token at a time and finish in any order; fixed-size blocks from one budget mean
no fragmentation and no copying, and a sequence's memory is exactly its block table. Layout per layer
``[num_blocks, block_size, n_kv_heads, head_dim]`` is what the paged-attention kernels read.
"""

from __future__ import annotations

import torch

from loraplex.engine.model.args import ModelArgs


def blocks_for(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


def bytes_per_block(args: ModelArgs, block_size: int, dtype: torch.dtype) -> int:
    """K and V of every layer for one block."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * args.num_layers * block_size * args.num_kv_heads * args.head_dim * element


def allocate_kv_caches(
    args: ModelArgs, num_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (num_blocks, block_size, args.num_kv_heads, args.head_dim)
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(args.num_layers)
    ]


class BlockManager:
    """Free-list of block ids; callers check ``can_allocate`` before ``allocate`` so nothing half-commits."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def needed(self, table: list[int], num_tokens: int) -> int:
        """Extra blocks ``table`` needs to cover ``num_tokens`` positions."""
        return max(0, blocks_for(num_tokens, self.block_size) - len(table))

    def can_allocate(self, table: list[int], num_tokens: int) -> bool:
        return self.needed(table, num_tokens) <= len(self._free)

    def allocate(self, table: list[int], num_tokens: int) -> None:
        """Grow ``table`` in place to cover ``num_tokens`` positions."""
        n = self.needed(table, num_tokens)
        if n > len(self._free):
            raise RuntimeError("allocate without can_allocate: out of KV blocks")
        table.extend(self._free.pop() for _ in range(n))

    def free(self, table: list[int]) -> None:
        """Return every block of ``table`` and empty it."""
        self._free.extend(reversed(table))
        table.clear()
