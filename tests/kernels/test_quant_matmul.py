"""The Triton dequant-matmul kernels for quantized base projections equal the torch dequantize-then-matmul path.

On CPU they run in Triton's interpreter (see conftest), so shapes are small but cover every edge: M below and
above a tile, N and K that are not tile multiples, partial last scale blocks, non-nested scales, output written
into a column slice of a wider buffer (the fused qkv layout), bias, and a dense part fused with quantized ones.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraplex.engine.context import Context
from loraplex.engine.model.quant_int8 import dequantize_int8, quantize_int8
from loraplex.engine.model.quant_linear import NF4Part, QuantizedLinear, set_quant_kernel
from loraplex.engine.model.quant_nf4 import NF4Tensors, block_scales, quantize_nf4
from tests.engine.helpers import BASE, drive, prompts, request, tokens
from tests.engine.test_quantized import quant_core

pytest.importorskip("triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _ctx() -> Context:
    return None  # type: ignore[return-value]  # the projections never read the step context


def _weight(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * 0.05).to(DEVICE)


def _x(m: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(m * 1000 + k)
    return torch.randn(m, k, generator=g).to(DEVICE, dtype)


def _without_nesting(t: NF4Tensors) -> NF4Tensors:
    """The same weight with plain fp32 block scales (checkpoints saved without double quantization)."""
    assert t.absmax2 is not None
    scales = block_scales(t.absmax, t.absmax2, t.offset, t.code2, t.nested_blocksize)
    return NF4Tensors(t.packed, scales, t.code, t.shape, t.dtype, t.blocksize)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 96, 128), (5, 64, 200), (40, 130, 64), (130, 48, 96)])
@pytest.mark.parametrize("method", ["nf4", "nf4-plain-scales", "int8"])
def test_kernel_equals_torch_path(method: str, m: int, n: int, k: int, dtype: torch.dtype) -> None:
    weight = _weight(n, k, seed=n + k).to(dtype)
    parts = {
        "nf4": lambda: quantize_nf4(weight),
        "nf4-plain-scales": lambda: _without_nesting(quantize_nf4(weight)),
        "int8": lambda: quantize_int8(weight),
    }
    module = QuantizedLinear([parts[method]()], None, dtype)
    x = _x(m, k, dtype)
    module.set_kernel("torch")
    want = module(x, _ctx())
    module.set_kernel("triton")
    got = module(x, _ctx())
    assert got.dtype == dtype and got.shape == (m, n)
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_fused_parts_write_their_columns_with_bias() -> None:
    """q (NF4) | k (int8) | v (dense) fused: each part lands in its own columns, bias added once."""
    q, k, v = _weight(64, 128, 1), _weight(32, 128, 2), _weight(32, 128, 3)
    bias = torch.randn(128, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    module = QuantizedLinear([quantize_nf4(q), quantize_int8(k), v], bias, torch.float32)
    x = _x(7, 128, torch.float32)
    module.set_kernel("triton")
    got = module(x, _ctx())
    cb_scb = quantize_int8(k)
    q_hat = NF4Part(quantize_nf4(q)).dequantize(torch.float32)
    w_hat = torch.cat([q_hat, dequantize_int8(cb_scb.cb, cb_scb.scb, torch.float32), v])
    torch.testing.assert_close(got, x @ w_hat.t() + bias, atol=1e-4, rtol=1e-4)
    assert torch.equal(module.dequantized_weight(), w_hat)


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_engine_on_quantized_kernels_matches_torch_path(
    method: str, tiny_models: dict[str, Path], tiny_adapters: dict[str, dict[str, Path]]
) -> None:
    """A mixed LoRA batch on a quantized base gives the same tokens through the kernels as through torch."""
    adapters = {name: tiny_adapters["qwen2"][name] for name in ("qv-r4", "all-r8")}
    names = [*adapters, BASE]
    batch = prompts(len(names), 5, seed=9)

    def run(kernel: str) -> tuple[list[list[int]], torch.Tensor]:
        core = quant_core(tiny_models["qwen2"], adapters, method)
        assert set_quant_kernel(core.loaded.model, kernel) == 2 * 4
        reqs = [request(f"r{i}", p, n, max_new_tokens=3) for i, (p, n) in enumerate(zip(batch, names, strict=True))]
        deltas, logits = drive(core, reqs, record_logits=True)
        return [tokens(deltas[f"r{i}"]) for i in range(len(names))], torch.stack(list(logits[0].values()))

    on_kernel, kernel_logits = run("triton")
    on_torch, torch_logits = run("torch")
    assert on_kernel == on_torch
    torch.testing.assert_close(kernel_logits, torch_logits, atol=1e-4, rtol=0)
