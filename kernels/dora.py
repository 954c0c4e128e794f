"""DoRA's per-column factor, applied to the tokens of DoRA adapters after every LoRA delta of a projection.

Semantics (PEFT's DoRA at inference, per module; ``out`` already holds ``W x + bias + s·B A x``)::

    for each DoRA token t with factor row r:   out[t, cols] = f[r] ⊙ (out[t, cols] - bias) + bias

Why after the deltas and on the fused output: the factor scales the base *and* the adapter term, while the bias
stays outside; plain-LoRA tokens and base rows are not touched. Plain torch (index_select / index_copy_), so it
runs on any device; computed in float32.
"""

from __future__ import annotations

import torch


def apply_dora_factors(
    out: torch.Tensor,
    tokens: torch.Tensor,
    rows: torch.Tensor,
    factors: torch.Tensor,
    offset: int,
    bias: torch.Tensor | None,
) -> None:
    """In place on ``out`` [T, H]: columns [offset, offset + width) of ``tokens`` [Td] scaled by ``factors[rows]``.

    tokens: int64 [Td], ascending and distinct (the runner lists them in step order); rows: int64 [Td];
    factors: float32 [F, width]; bias: the module's bias [width] or None.
    """
    width = int(factors.shape[1])
    cols = out[:, offset : offset + width]
    f = factors.index_select(0, rows)  # [Td, width]
    if out.dtype == torch.float32 and tokens.numel() == out.shape[0]:
        # Every token is a DoRA token (``tokens`` is ascending, so it is 0..T-1): scale in place, no gather/scatter.
        if bias is not None:
            cols.sub_(bias).mul_(f).add_(bias)
        else:
            cols.mul_(f)
        return
    picked = cols.index_select(0, tokens).float()  # [Td, width]
    if bias is not None:
        b = bias.float()
        picked = (picked - b) * f + b
    else:
        picked = picked * f
    cols.index_copy_(0, tokens, picked.to(out.dtype))
