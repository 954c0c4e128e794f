"""Plain building blocks of the Llama family: linear, RMS norm, embedding, LM head.

Why our own tiny classes instead of ``nn.Linear``: every block takes ``(x, ctx)`` so the LoRA transform can
swap a block for its LoRA-aware twin without changing the model code that calls it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.engine.context import Context


class Linear(nn.Module):
    """y = x Wᵀ + b; ``weight`` may be several projections fused along the output axis (qkv, gate_up)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [h_out, h_in]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Embedding(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [vocab, hidden]

    def forward(self, ids: torch.Tensor, ctx: Context) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class LMHead(nn.Module):
    """Logits for the selected rows only; may share its weight with the embedding (tied checkpoints)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [vocab, hidden]

    def forward(self, hidden: torch.Tensor, ctx: Context) -> torch.Tensor:
        return F.linear(hidden, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # Same math as below (no casts to round through in fp32), in one fused op instead of six.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)
