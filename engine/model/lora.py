"""The LoRA module transform: swap the model's projections for LoRA-aware twins bound to the adapter pool.

Why a transform after loading: the model code stays pure (it never mentions adapters), and the twins hold
views of the pool's preallocated buffers, so loading or evicting an adapter never touches the model. Each twin
runs its base computation, then adds every token's adapter delta through the engine's one ``LoRABackend``
(``loraplex.kernels.lora``): forward → ``backend.apply`` → kernel. The backend's per-step grouping is prepared
once per step by the runner and reaches the twins as ``ctx.lora`` / ``ctx.lora_logits``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from loraplex.engine.adapters.pool import AdapterPool
from loraplex.engine.context import Context
from loraplex.engine.model.llama import CausalLM, fused_slices
from loraplex.kernels.dora import apply_dora_factors
from loraplex.kernels.lora import LoRABackend
from loraplex.kernels.types import LoRAModuleWeights, LoRASlice


@dataclass(frozen=True)
class DoraSlice:
    """One slice's DoRA factors (the pool's ``DoraStore`` buffer of this module) and its part of the bias."""

    factors: torch.Tensor  # float32 [F, h_out]
    offset: int
    bias: torch.Tensor | None


class LoRALinear(nn.Module):
    """base(x) plus, per token, its adapter's delta for every fused slice (q/k/v into qkv, gate/up).

    With ``ctx.extras``: the merged adapter's negated delta for every token but its own, then DoRA's per-column
    factor for the tokens of DoRA adapters (after every delta, so it scales base and adapter terms alike).
    """

    def __init__(
        self, base: nn.Module, slices: tuple[LoRASlice, ...], backend: LoRABackend, dora: tuple[DoraSlice, ...] = ()
    ) -> None:
        super().__init__()
        self.base = base
        self.slices = slices
        self.backend = backend
        self.dora = dora

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        out: torch.Tensor = self.base(x, ctx)  # x: [T, h_in] -> out: [T, sum(h_out)]
        self.backend.apply(x, out, self.slices, ctx.lora)
        extras = ctx.extras
        if extras is not None:
            if extras.unmerge is not None:
                self.backend.apply(x, out, self.slices, extras.unmerge)
            if extras.dora_tokens is not None and extras.dora_rows is not None:
                for d in self.dora:
                    apply_dora_factors(out, extras.dora_tokens, extras.dora_rows, d.factors, d.offset, d.bias)
        return out


class LoRAEmbedding(nn.Module):
    def __init__(self, base: nn.Module, weights: LoRAModuleWeights, backend: LoRABackend) -> None:
        super().__init__()
        self.base = base
        self.lora_weights = weights
        self.backend = backend

    def forward(self, ids: torch.Tensor, ctx: Context) -> torch.Tensor:
        out: torch.Tensor = self.base(ids, ctx)  # [T, hidden]
        self.backend.embedding(ids, self.lora_weights, out, ctx.lora)
        if ctx.extras is not None and ctx.extras.unmerge is not None:
            self.backend.embedding(ids, self.lora_weights, out, ctx.extras.unmerge)
        return out


class LoRALMHead(nn.Module):
    """lm_head LoRA on the logits rows only, so it uses the per-logits-row grouping ``ctx.lora_logits``."""

    def __init__(self, base: nn.Module, weights: LoRAModuleWeights, backend: LoRABackend) -> None:
        super().__init__()
        self.base = base
        self.slices = (LoRASlice(weights, 0),)
        self.backend = backend

    def forward(self, hidden: torch.Tensor, ctx: Context) -> torch.Tensor:
        out: torch.Tensor = self.base(hidden, ctx)  # [N, vocab]
        self.backend.apply(hidden, out, self.slices, ctx.lora_logits)
        if ctx.extras is not None and ctx.extras.unmerge_logits is not None:
            self.backend.apply(hidden, out, self.slices, ctx.extras.unmerge_logits)
        return out


def apply_lora_transform(model: CausalLM, pool: AdapterPool, backend: LoRABackend) -> None:
    """Wrap every LoRA-capable module of ``model`` in place with views of ``pool``'s buffers.

    Every wrapper calls the same ``backend``: a step's grouping is prepared once for every layer, and the torch
    backend's chunked weights survive across steps while the step's adapters and the pool stay the same.
    """
    plan = fused_slices(model.args)
    for i, layer in enumerate(model.layers):
        for parent in (layer.self_attn, layer.mlp):
            for attr, parts in plan.items():
                base = getattr(parent, attr, None)
                if base is None:
                    continue
                slices = tuple(LoRASlice(pool.weights[(i, name)], offset) for name, offset in parts)
                dora = _dora_slices(base, pool, i, parts)
                setattr(parent, attr, LoRALinear(base, slices, backend, dora))
    if (None, "embed_tokens") in pool.weights:
        model.embed_tokens = LoRAEmbedding(model.embed_tokens, pool.weights[(None, "embed_tokens")], backend)
    if (None, "lm_head") in pool.weights:
        model.lm_head = LoRALMHead(model.lm_head, pool.weights[(None, "lm_head")], backend)


def _dora_slices(
    base: nn.Module, pool: AdapterPool, layer: int, parts: tuple[tuple[str, int], ...]
) -> tuple[DoraSlice, ...]:
    """The DoRA factor buffers of one fused projection's modules, with each module's bias slice."""
    if pool.dora.capacity == 0:
        return ()
    bias = getattr(base, "bias", None)
    out = []
    for name, offset in parts:
        factors = pool.dora.factors[(layer, name)]
        width = int(factors.shape[1])
        part = None if not isinstance(bias, torch.Tensor) else bias[offset : offset + width]
        out.append(DoraSlice(factors, offset, part))
    return tuple(out)
