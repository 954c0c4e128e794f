"""int8 base weights: bitsandbytes' row-wise (vector-wise) absmax format, served weight-only.

The format is bitsandbytes' ``Int8Params`` (what transformers' ``load_in_8bit`` stores as ``weight`` + ``SCB``):

    W16     = W cast to float16                         (bitsandbytes quantizes from fp16)
    SCB[n]  = max_k |W16[n, k]|                          (fp32, one scale per output row)
    CB      = round_half_even(W16 * (127 / SCB[n]))     (int8 [N, K]; a zero row stays zero)
    Ŵ       = CB.to(dtype) * (SCB * (1/127))            (rounded to the compute dtype)

The matmul is weight-only (W8A16): activations stay in the compute dtype and see Ŵ. That is bitsandbytes'
``MatMul8bitFp`` path (its CPU/XPU int8 matmul: dequantize, then ``F.linear``), the documented reference the tests
compare with. We do not run LLM.int8's mixed-precision decomposition (fp16-quantized activations plus fp16
outlier columns): it quantizes activations too, so it would not equal the full-precision math the LoRA
deltas are added to, it needs int8 GEMM kernels with an outlier side path on every backend, and the win int8
is used for here — half the weight bytes a memory-bound decode step reads — comes from the weights alone.
Memory: 8 bits per weight + 32 bits per row, ~0.50 of bf16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Int8Tensors:
    """One projection's int8 weight: ``cb`` int8 [N, K] and its per-row ``scb`` fp32 [N]."""

    cb: torch.Tensor
    scb: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.cb.shape[0]), int(self.cb.shape[1])

    def to(self, device: torch.device) -> Int8Tensors:
        return Int8Tensors(cb=self.cb.to(device), scb=self.scb.to(device))


def quantize_int8(weight: torch.Tensor) -> Int8Tensors:
    """Quantize a [N, K] weight row-wise, on the weight's device (bit-equal to bitsandbytes' Int8Params)."""
    w16 = weight.to(torch.float16)
    scb = w16.abs().amax(dim=1).float()
    safe = torch.where(scb == 0, torch.ones_like(scb), scb)
    cb = torch.round(w16 * (127.0 / safe[:, None])).to(torch.int8)  # fp16 * fp32 computes in fp32
    return Int8Tensors(cb=cb, scb=scb)


def dequantize_int8(cb: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Ŵ [N, K] in ``dtype``: each int8 value times its row's SCB/127, rounded once to ``dtype``."""
    return (cb.to(dtype) * (scb[:, None] * (1.0 / 127.0))).to(dtype)
