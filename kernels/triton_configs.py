"""Autotune search spaces, shape classes and the interpreter switch for the Triton kernels.

Why one module: the kernels' launch code must stay free of tuning policy, and the policy must be decided at
*call* time (not import time) so that ``TRITON_INTERPRET=1`` set after import still selects the one default
config instead of benchmarking a dozen configs through the slow CPU interpreter.
"""

from __future__ import annotations

import os
from typing import Any

import triton


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (tests on machines without a GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def bucket(value: int, limits: tuple[int, ...]) -> int:
    """The smallest limit >= value (or the last one): a coarse shape class for autotune keys.

    Keying on the exact token count would re-tune every step of a serving engine; buckets keep one tuned
    config per regime (decode, small prefill, large prefill).
    """
    for limit in limits:
        if value <= limit:
            return limit
    return limits[-1]


TOKEN_CLASSES = (16, 64, 256, 1024, 4096)
RANK_CLASSES = (16, 32, 64, 128, 256)


def _cfg(num_warps: int = 4, num_stages: int = 3, **meta: int) -> triton.Config:
    return triton.Config(dict(meta), num_warps=num_warps, num_stages=num_stages)


# Shrink: output is tiny ([T, r]) and K = h_in is long, so small M/N tiles and split-K carry the load.
SHRINK_DEFAULT = _cfg(BLOCK_M=16, BLOCK_N=16, BLOCK_K=128, SPLIT_K=8)
SHRINK_CONFIGS = [
    SHRINK_DEFAULT,
    *(
        _cfg(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, num_stages=st)
        for bm, bn, bk, sk, st in (
            (16, 16, 256, 4, 3),
            (16, 16, 128, 16, 3),
            (16, 16, 64, 32, 4),
            (16, 32, 128, 8, 3),
            (16, 64, 128, 4, 3),
            (32, 16, 128, 8, 3),
            (32, 32, 128, 4, 3),
            (64, 16, 64, 4, 4),
            (64, 32, 64, 2, 4),
            (64, 64, 64, 1, 3),
            (128, 16, 64, 1, 3),
            (128, 64, 32, 1, 4),
        )
    ),
]

# Expand: K = rank is short, N = h_out is long; wide N tiles stream B rows and the output.
EXPAND_DEFAULT = _cfg(BLOCK_M=16, BLOCK_N=128, BLOCK_K=16)
EXPAND_CONFIGS = [
    EXPAND_DEFAULT,
    *(
        _cfg(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw)
        for bm, bn, bk, nw in (
            (16, 64, 16, 4),
            (16, 256, 16, 4),
            (16, 128, 32, 4),
            (16, 128, 64, 4),
            (32, 128, 16, 4),
            (32, 64, 32, 4),
            (64, 64, 32, 4),
            (64, 128, 16, 8),
            (128, 64, 16, 4),
            (128, 128, 32, 8),
        )
    ),
]

# Paged decode attention: one program per (sequence, kv head[, partition]); BLOCK_N tokens per step.
ATTENTION_DEFAULT = _cfg(BLOCK_N=64, num_warps=4, num_stages=2)
ATTENTION_CONFIGS = [
    ATTENTION_DEFAULT,
    _cfg(BLOCK_N=32, num_warps=4, num_stages=2),
    _cfg(BLOCK_N=128, num_warps=4, num_stages=2),
    _cfg(BLOCK_N=64, num_warps=8, num_stages=3),
    _cfg(BLOCK_N=128, num_warps=8, num_stages=3),
]


# Paged prefill attention: rows = BLOCK_M tokens x the GQA group; BLOCK_N keys per step.
PREFILL_DEFAULT = _cfg(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2)
PREFILL_CONFIGS = [
    PREFILL_DEFAULT,
    _cfg(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=2),
    _cfg(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2),
    _cfg(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2),
    _cfg(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2),
    _cfg(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3),
]


def prune_shrink(configs: list[triton.Config], named_args: dict[str, Any], **_: Any) -> list[triton.Config]:
    """Drop configs whose K chunks are shorter than one K tile; only the default when interpreting."""
    if interpreting():
        return [SHRINK_DEFAULT]
    h_in = int(named_args["h_in"])
    kept = [c for c in configs if triton.cdiv(h_in, c.kwargs["SPLIT_K"]) >= c.kwargs["BLOCK_K"]]
    return kept or [SHRINK_DEFAULT]


def prune_expand(configs: list[triton.Config], named_args: dict[str, Any], **_: Any) -> list[triton.Config]:
    """Only the default when interpreting; otherwise keep tiles no wider than the widest slice."""
    if interpreting():
        return [EXPAND_DEFAULT]
    widest = int(named_args["max_h_out"])
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= max(16, triton.next_power_of_2(widest))]
    return kept or [EXPAND_DEFAULT]


def prune_attention(configs: list[triton.Config], named_args: dict[str, Any], **_: Any) -> list[triton.Config]:
    """Only the default when interpreting; otherwise tiles no longer than a partition."""
    if interpreting():
        return [ATTENTION_DEFAULT]
    part = int(named_args["partition_size"])
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= part]
    return kept or [ATTENTION_DEFAULT]


def prune_prefill(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
    """Only the default when interpreting; otherwise keep tiles of at most 256 rows (tokens x GQA group)."""
    if interpreting():
        return [PREFILL_DEFAULT]
    group = int(triton.next_power_of_2(int(kwargs.get("GROUP", named_args.get("GROUP", 1)))))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] * group <= 256]
    return kept or [PREFILL_DEFAULT]
