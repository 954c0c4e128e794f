"""Rotary position embeddings with the scaling variants Llama-family checkpoints use.

Why a precomputed table: positions are arbitrary per token in a continuous batch (each sequence is at its own
offset), so cos/sin are gathered by position from one table built once at load, in float32.
"""

from __future__ import annotations

import math

import torch

from loraplex.engine.model.args import ModelArgs


def inverse_frequencies(args: ModelArgs) -> torch.Tensor:
    """inv_freq [head_dim / 2] in float32, after the checkpoint's rope scaling."""
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rope_type = args.rope_type
    if rope_type == "linear":
        return inv_freq / float(args.rope["factor"])
    if rope_type == "llama3":
        return _llama3(inv_freq, args)
    return inv_freq


def _llama3(inv_freq: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths divided by ``factor``, short ones kept, a smooth ramp between."""
    factor = float(args.rope["factor"])
    low = float(args.rope["low_freq_factor"])
    high = float(args.rope["high_freq_factor"])
    old_len = float(args.rope["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryTable:
    """cos/sin for every position below ``max_len``: [max_len, head_dim] each, already in the model dtype."""

    def __init__(self, args: ModelArgs, max_len: int, device: torch.device, dtype: torch.dtype) -> None:
        inv_freq = inverse_frequencies(args).to(device)
        positions = torch.arange(max_len, dtype=torch.float32, device=device)
        freqs = torch.outer(positions, inv_freq)  # [max_len, head_dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(dtype)
        self.sin = emb.sin().to(dtype)

    def apply(
        self, x: torch.Tensor, positions: torch.Tensor, memo: dict[object, tuple[torch.Tensor, ...]] | None = None
    ) -> torch.Tensor:
        """Rotate x [T, heads, head_dim] by each token's position (positions: int64 [T]).

        ``memo`` (the step context's) keeps the gathered cos/sin so every layer of a step reuses one gather.
        """
        cached = None if memo is None else memo.get(self)
        if cached is None:
            cached = (self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1))  # [T, 1, d] each
            if memo is not None:
                memo[self] = cached
        cos, sin = cached
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin
