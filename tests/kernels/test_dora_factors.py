"""``apply_dora_factors`` (the step's DoRA scaling) against the per-token reference ``apply_dora_factor``.

Covers both of its paths: some tokens DoRA (gather, scale, scatter back; other rows untouched) and every token
DoRA (scaled in place), with and without a bias, in float32 and bfloat16.
"""

from __future__ import annotations

import pytest
import torch

from loraplex.engine.adapters.dora import apply_dora_factor
from loraplex.kernels.dora import apply_dora_factors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("every_token", [False, True])
def test_factors_scale_exactly_the_dora_tokens(dtype: torch.dtype, with_bias: bool, every_token: bool) -> None:
    g = torch.Generator().manual_seed(7)
    t, width, offset = 9, 6, 4
    out = torch.randn(t, offset + width + 3, generator=g).to(dtype)
    factors = torch.rand(3, width, generator=g) + 0.5  # float32 rows of the DoRA store
    bias = torch.randn(width, generator=g).to(dtype) if with_bias else None
    tokens = torch.arange(t) if every_token else torch.tensor([1, 4, 5, 8])
    rows = torch.randint(0, 3, (len(tokens),), generator=g)
    expected = out.clone()
    for token, row in zip(tokens.tolist(), rows.tolist(), strict=True):
        y = out[token, offset : offset + width].float()
        b = None if bias is None else bias.float()
        expected[token, offset : offset + width] = apply_dora_factor(y, factors[row], b).to(dtype)
    apply_dora_factors(out, tokens, rows, factors, offset, bias)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)
    untouched = torch.ones(out.shape[1], dtype=torch.bool)
    untouched[offset : offset + width] = False
    assert torch.equal(out[:, untouched], expected[:, untouched])
