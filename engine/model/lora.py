"""The LoRA module transform: swap the model's projections for LoRA-aware twins bound to the adapter pool.

Why a transform after loading: the model code stays pure (it never mentions adapters), and the twins hold
views of the pool's preallocated buffers, so loading or evicting an adapter never touches the model. Each twin
runs its base computation, then adds every token's adapter delta through the engine's one ``LoRABackend``
(``loraplex.kernels.lora``): forward → ``backend.apply`` → kernel. The backend's per-step grouping is prepared
once per step by the runner and reaches the twins as ``ctx.lora`` / ``ctx.lora_logits``.
"""

from __future__ import annotations

import torch
from torch import nn

from loraplex.engine.adapters.pool import AdapterPool
from loraplex.engine.context import Context
from loraplex.engine.model.llama import CausalLM, fused_slices
from loraplex.kernels.lora import LoRABackend
from loraplex.kernels.types import LoRAModuleWeights, LoRASlice


class LoRALinear(nn.Module):
    """base(x) plus, per token, its adapter's delta for every fused slice (q/k/v into qkv, gate/up)."""

    def __init__(self, base: nn.Module, slices: tuple[LoRASlice, ...], backend: LoRABackend) -> None:
        super().__init__()
        self.base = base
        self.slices = slices
        self.backend = backend

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        out: torch.Tensor = self.base(x, ctx)  # x: [T, h_in] -> out: [T, sum(h_out)]
        self.backend.apply(x, out, self.slices, ctx.lora)
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
                setattr(parent, attr, LoRALinear(base, slices, backend))
    if (None, "embed_tokens") in pool.weights:
        model.embed_tokens = LoRAEmbedding(model.embed_tokens, pool.weights[(None, "embed_tokens")], backend)
    if (None, "lm_head") in pool.weights:
        model.lm_head = LoRALMHead(model.lm_head, pool.weights[(None, "lm_head")], backend)
