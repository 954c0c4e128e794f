"""The quantized twin of ``Linear``: same ``(x, ctx)`` call, same [T, h_out] output, weights kept packed.

A fused projection (qkv, gate_up) holds one *part* per original module, each quantized on its own exactly as
bitsandbytes quantizes that module (its own scales and double-quantization offset), so a checkpoint saved by
transformers maps part for part and quantize-at-load equals it. The LoRA transform wraps this module as its
``base`` and adds adapter deltas to the output unchanged; the adapter math stays in the compute dtype.

Where the product runs:
  * CUDA (or ``kernel = "triton"``): one Triton dequant-matmul launch per part writes its columns of the output;
    the full-precision weight never exists in memory (``quant_kernels``).
  * elsewhere: the parts are dequantized into one [h_out, h_in] weight per call and multiplied. That costs a
    decode of the weight every step; CPU serving is for tests and small models, and ``bench/quant.py`` measures it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from loraplex.engine.context import Context
from loraplex.engine.model.layers import Linear
from loraplex.engine.model.quant_int8 import Int8Tensors, dequantize_int8
from loraplex.engine.model.quant_nf4 import NF4Tensors, block_scales, byte_pairs, dequantize_nf4

QuantizedTensors = NF4Tensors | Int8Tensors
WeightLike = torch.Tensor | NF4Tensors | Int8Tensors
_KERNEL_CHOICES = ("auto", "triton", "torch")


class QuantPart(nn.Module):
    """One original projection's weight inside a fused module: [out_features, in_features] once decoded."""

    out_features: int
    in_features: int

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """Ŵ [out_features, in_features] in ``dtype``."""
        raise NotImplementedError

    def matmul_into(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """out[T, out_features] = x · Ŵᵀ through the fused kernel (``out`` may be a column slice)."""
        raise NotImplementedError


class NF4Part(QuantPart):
    def __init__(self, t: NF4Tensors) -> None:
        super().__init__()
        self.out_features, self.in_features = t.shape
        self.blocksize = t.blocksize
        self.nested_blocksize = t.nested_blocksize
        self.source_dtype = t.dtype
        self.packed: torch.Tensor
        self.absmax: torch.Tensor
        self.code: torch.Tensor
        self.register_buffer("packed", t.packed.reshape(-1).contiguous())
        self.register_buffer("absmax", t.absmax.reshape(-1).contiguous())
        self.register_buffer("code", t.code.float().contiguous())
        self.absmax2: torch.Tensor | None
        self.code2: torch.Tensor | None
        self.offset: torch.Tensor | None
        nested = t.absmax2 is not None and t.code2 is not None and t.offset is not None
        self.register_buffer("absmax2", t.absmax2.reshape(-1).float() if nested and t.absmax2 is not None else None)
        self.register_buffer("code2", t.code2.float().contiguous() if nested and t.code2 is not None else None)
        self.register_buffer("offset", t.offset.reshape(1).float() if nested and t.offset is not None else None)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        scales = block_scales(self.absmax, self.absmax2, self.offset, self.code2, self.nested_blocksize)
        shape = (self.out_features, self.in_features)
        pairs = byte_pairs(self.code)  # [256, 2]: rebuilt per call (256 values) rather than stored per part
        return dequantize_nf4(self.packed, scales, pairs, shape, self.blocksize, self.source_dtype, dtype)

    def matmul_into(self, x: torch.Tensor, out: torch.Tensor) -> None:
        from loraplex.engine.model.quant_kernels import nf4_matmul

        nested = None
        if self.absmax2 is not None and self.code2 is not None and self.offset is not None:
            nested = (self.absmax2, self.code2, self.offset, self.nested_blocksize)
        shape = (self.out_features, self.in_features)
        nf4_matmul(x, out, self.packed, self.absmax, self.code, shape, self.blocksize, self.source_dtype, nested)


class Int8Part(QuantPart):
    def __init__(self, t: Int8Tensors) -> None:
        super().__init__()
        self.out_features, self.in_features = t.shape
        self.cb: torch.Tensor
        self.scb: torch.Tensor
        self.register_buffer("cb", t.cb.contiguous())
        self.register_buffer("scb", t.scb.float().contiguous())

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_int8(self.cb, self.scb, dtype)

    def matmul_into(self, x: torch.Tensor, out: torch.Tensor) -> None:
        from loraplex.engine.model.quant_kernels import int8_matmul

        int8_matmul(x, out, self.cb, self.scb)


class DensePart(QuantPart):
    """A module a quantized checkpoint left unquantized, fused with quantized siblings (e.g. a skipped k_proj)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.weight: torch.Tensor
        self.register_buffer("weight", weight.contiguous())

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.to(dtype)

    def matmul_into(self, x: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(torch.mm(x, self.weight.t()))


def _part(w: WeightLike) -> QuantPart:
    if isinstance(w, NF4Tensors):
        return NF4Part(w)
    if isinstance(w, Int8Tensors):
        return Int8Part(w)
    return DensePart(w)


class QuantizedLinear(nn.Module):
    """y = x Ŵᵀ + b over packed parts fused along the output axis (q|k|v, gate|up, or a single module)."""

    def __init__(self, parts: Sequence[WeightLike], bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.parts = nn.ModuleList([_part(w) for w in parts])
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.dtype = dtype
        self.out_features = sum(p.out_features for p in self._parts())
        self.in_features = self._parts()[0].in_features
        self.kernel = "auto"

    def _parts(self) -> list[QuantPart]:
        return [p for p in self.parts if isinstance(p, QuantPart)]

    def set_kernel(self, choice: str) -> None:
        """"auto" (Triton on CUDA, torch elsewhere), or force "triton" / "torch" (tests, debugging)."""
        if choice not in _KERNEL_CHOICES:
            raise ValueError(f"kernel must be one of {_KERNEL_CHOICES}, got {choice!r}")
        self.kernel = choice

    def dequantized_weight(self) -> torch.Tensor:
        """Ŵ [h_out, h_in] in the compute dtype, for load-time use (e.g. DoRA's per-column norms)."""
        return torch.cat([p.dequantize(self.dtype) for p in self._parts()], dim=0)

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        use_kernel = self.kernel == "triton" or (self.kernel == "auto" and x.is_cuda)
        if not use_kernel:
            weight = self.dequantized_weight()  # [h_out, h_in]
            if self.bias is None:
                return torch.mm(x, weight.t())
            return torch.addmm(self.bias, x, weight.t())
        out = x.new_empty((x.shape[0], self.out_features))  # x: [T, h_in] -> out: [T, h_out]
        col = 0
        for part in self._parts():
            part.matmul_into(x, out[:, col : col + part.out_features])
            col += part.out_features
        if self.bias is not None:
            out += self.bias
        return out


def make_linear(parts: Sequence[WeightLike], bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Module:
    """``Linear`` over the concatenated weights when every part is dense, else a ``QuantizedLinear``."""
    dense = [p for p in parts if isinstance(p, torch.Tensor)]
    if len(dense) == len(parts):
        return Linear(dense[0] if len(dense) == 1 else torch.cat(dense), bias)
    return QuantizedLinear(parts, bias, dtype)


def set_quant_kernel(model: nn.Module, choice: str) -> int:
    """Force every quantized projection of ``model`` onto one path; returns how many modules were set."""
    count = 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.set_kernel(choice)
            count += 1
    return count
