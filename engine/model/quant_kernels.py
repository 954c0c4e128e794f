# mypy: disable-error-code="untyped-decorator,no-untyped-def"
# (Triton @jit kernels take untyped tensor/constexpr handles; the host-side launchers below are fully typed.)
"""Triton dequant-matmul kernels for quantized base projections: out[:, cols] = x · Ŵᵀ, Ŵ decoded in registers.

Why fused: a decode step is memory-bound, so the point of a 4-bit (or 8-bit) base is to read 4 (or 8) bits per
weight from HBM. Dequantizing the whole weight first would write and re-read it at 16 bits every step. Each
program decodes one [BLOCK_N, BLOCK_K] weight tile into registers and feeds ``tl.dot``; nothing of Ŵ is stored.

Semantics (the same formulas as the torch path in ``quant_nf4`` / ``quant_int8``; fp32 products):
    NF4:   e = n*K + k;  s = dyn[q[e // bs]] * a2[e // (bs*nbs)] + c  (double-quantized)  or  absmax[e // bs]
           Ŵ[n, k] = to_src(nf4[nibble(e)] * s)             nibble(e): high 4 bits of byte e//2 when e is even
    int8:  Ŵ[n, k] = to_dtype(cb[n, k] * (scb[n] * (1/127)))
    out[m, n] = Σ_k x[m, k] · Ŵ[n, k]                        (fp32 accumulate, stored in out's dtype)

NF4 packs the even and odd columns of a row into one byte, so the kernel splits x the same way (even columns ·
high nibbles + odd columns · low nibbles) instead of interleaving decoded values in registers. Launch shapes are
fixed per token-count class (no autotuning yet: the first GPU run should tune ``_tiles``); nothing in a launch
reads device values, so it can be captured in a CUDA graph.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _dot_dtype(dtype: torch.dtype) -> tl.dtype:
    """Halves feed tensor cores; the CPU interpreter mishandles bf16 products, so widen them there (exact)."""
    if dtype == torch.bfloat16 and _interpreting():
        return tl.float32
    return _TL[dtype]


def _precision(dtype: torch.dtype) -> str | None:
    """fp32 operands use IEEE products (tf32 would miss the torch path by ~1e-3)."""
    return "ieee" if _dot_dtype(dtype) == tl.float32 else None


def _tiles(m: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K): small M (decode) takes the narrowest M tile tl.dot accepts."""
    if m <= 16:
        return 16, 32, 128  # narrow N tiles: more programs to cover the SMs when M is tiny
    if m <= 64:
        return 64, 64, 64
    return 128, 64, 64


@triton.jit
def _nf4_kernel(
    x_ptr,  # [M, K], unit stride along K
    out_ptr,  # [M, N] view (row stride stride_om), unit stride along N
    packed_ptr,  # uint8 [ceil(N*K/2)]
    absmax_ptr,  # uint8 (double-quantized) or fp32 [ceil(N*K/bs)]
    absmax2_ptr,  # fp32 [ceil(blocks/nbs)] (double-quantized only)
    code2_ptr,  # fp32 [256] (double-quantized only)
    offset_ptr,  # fp32 [1] (double-quantized only)
    code_ptr,  # fp32 [16]
    M,
    N,
    K,
    stride_xm,
    stride_om,
    BLOCKSIZE: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    SRC_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, BLOCK_K // 2)
    mask_m = rm < M
    mask_n = rn < N
    half_k = K // 2
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offset = 0.0
    if NESTED:
        offset = tl.load(offset_ptr)
    for k0 in range(0, K, BLOCK_K):
        j = k0 // 2 + rj  # byte (= column pair) index within a row
        mask_j = j < half_k
        mask_w = mask_n[:, None] & mask_j[None, :]
        even = rn[:, None].to(tl.int64) * K + 2 * j[None, :]  # flat index of the pair's even element
        byte = tl.load(packed_ptr + even // 2, mask=mask_w, other=0).to(tl.int32)
        block = even // BLOCKSIZE  # the odd element shares it: blocks are even-sized
        if NESTED:
            q = tl.load(absmax_ptr + block, mask=mask_w, other=0).to(tl.int32)
            a2 = tl.load(absmax2_ptr + block // NESTED_BLOCKSIZE, mask=mask_w, other=0.0)
            scale = tl.load(code2_ptr + q) * a2 + offset
        else:
            scale = tl.load(absmax_ptr + block, mask=mask_w, other=0.0)
        w_hi = (tl.load(code_ptr + (byte >> 4)) * scale).to(SRC_DTYPE).to(DOT_DTYPE)  # [BLOCK_N, BLOCK_K/2]
        w_lo = (tl.load(code_ptr + (byte & 0xF)) * scale).to(SRC_DTYPE).to(DOT_DTYPE)
        mask_x = mask_m[:, None] & mask_j[None, :]
        x_even_ptr = x_ptr + rm[:, None] * stride_xm + 2 * j[None, :]
        x_even = tl.load(x_even_ptr, mask=mask_x, other=0.0).to(DOT_DTYPE)
        x_odd = tl.load(x_even_ptr + 1, mask=mask_x, other=0.0).to(DOT_DTYPE)
        acc = tl.dot(x_even, tl.trans(w_hi), acc, input_precision=PRECISION)
        acc = tl.dot(x_odd, tl.trans(w_lo), acc, input_precision=PRECISION)
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
    tl.store(out_ptrs, acc.to(OUT_DTYPE), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _int8_kernel(
    x_ptr,  # [M, K], unit stride along K
    out_ptr,  # [M, N] view (row stride stride_om)
    cb_ptr,  # int8 [N, K] contiguous
    scb_ptr,  # fp32 [N]
    M,
    N,
    K,
    stride_xm,
    stride_om,
    W_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M
    mask_n = rn < N
    row_scale = tl.load(scb_ptr + rn, mask=mask_n, other=0.0) * (1.0 / 127.0)  # [BLOCK_N] fp32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        mask_k = k < K
        cb_ptrs = cb_ptr + rn[:, None].to(tl.int64) * K + k[None, :]
        cb = tl.load(cb_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0)
        w = (cb.to(tl.float32) * row_scale[:, None]).to(W_DTYPE).to(DOT_DTYPE)  # [BLOCK_N, BLOCK_K]
        x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(x.to(DOT_DTYPE), tl.trans(w), acc, input_precision=PRECISION)
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
    tl.store(out_ptrs, acc.to(OUT_DTYPE), mask=mask_m[:, None] & mask_n[None, :])


def _check(x: torch.Tensor, out: torch.Tensor, n: int, k: int) -> None:
    if x.dim() != 2 or x.shape[1] != k or x.stride(1) != 1:
        raise ValueError(f"x must be [M, {k}] with unit column stride, got {tuple(x.shape)} / {x.stride()}")
    if out.dim() != 2 or out.shape != (x.shape[0], n) or out.stride(1) != 1:
        raise ValueError(f"out must be [{x.shape[0]}, {n}] with unit column stride, got {tuple(out.shape)}")


def nf4_matmul(
    x: torch.Tensor,
    out: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    shape: tuple[int, int],
    blocksize: int,
    source_dtype: torch.dtype,
    nested: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None,
) -> None:
    """out = x · Ŵᵀ for an NF4 weight; ``nested`` = (absmax2, code2, offset[1], nested_blocksize) or None."""
    n, k = shape
    _check(x, out, n, k)
    if k % 2 or blocksize % 2:
        raise ValueError(f"NF4 kernel needs an even in-features and blocksize, got K={k}, blocksize={blocksize}")
    m = x.shape[0]
    if m == 0:
        return
    block_m, block_n, block_k = _tiles(m)
    absmax2, code2, offset, nbs = nested if nested is not None else (absmax, code, code, 1)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _nf4_kernel[grid](
        x,
        out,
        packed,
        absmax,
        absmax2,
        code2,
        offset,
        code,
        m,
        n,
        k,
        x.stride(0),
        out.stride(0),
        BLOCKSIZE=blocksize,
        NESTED_BLOCKSIZE=nbs,
        NESTED=nested is not None,
        SRC_DTYPE=_TL[source_dtype],
        DOT_DTYPE=_dot_dtype(x.dtype),
        OUT_DTYPE=_TL[out.dtype],
        PRECISION=_precision(x.dtype),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )


def int8_matmul(x: torch.Tensor, out: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor) -> None:
    """out = x · Ŵᵀ for a row-wise int8 weight (``cb`` [N, K] contiguous, ``scb`` [N])."""
    n, k = int(cb.shape[0]), int(cb.shape[1])
    _check(x, out, n, k)
    m = x.shape[0]
    if m == 0:
        return
    block_m, block_n, block_k = _tiles(m)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int8_kernel[grid](
        x,
        out,
        cb,
        scb,
        m,
        n,
        k,
        x.stride(0),
        out.stride(0),
        W_DTYPE=_TL[x.dtype],
        DOT_DTYPE=_dot_dtype(x.dtype),
        OUT_DTYPE=_TL[out.dtype],
        PRECISION=_precision(x.dtype),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
