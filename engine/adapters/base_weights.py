"""Where each PEFT module's base weight lives inside the engine's (fused, transposed) model.

Why one place: folding an adapter into the base (``merge``) and DoRA's per-column norm (``dora``) both need
"the [h_out, h_in] weight of (layer, module)" — but the engine fuses q/k/v into ``qkv_proj`` and gate/up into
``gate_up_proj`` (``fused_slices`` gives the output offsets) and stores ``Linear.weight_t`` transposed,
[h_in, h_out]. ``locate`` hides that layout behind one small record, so neither caller repeats the arithmetic.

Only plain blocks are located: a projection that is not exactly ``Linear`` (a quantized one, say) has no dense
weight to fold into or to take a norm of, and is refused with ``FailedPrecondition`` naming it. LoRA wrappers
(anything holding the plain block as ``.base``) are looked through.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from loraplex.engine.adapters.types import ModuleKey
from loraplex.engine.model.layers import Embedding, Linear, LMHead
from loraplex.engine.model.llama import CausalLM, fused_slices
from loraplex.registry.errors import FailedPrecondition
from loraplex.registry.spec import ATTENTION_MODULES

_Block = TypeVar("_Block", bound=nn.Module)
_MAX_WRAPPERS = 8  # LoRA twins nest at most a few deep; a cycle must not loop forever


@dataclass(frozen=True)
class WeightSlice:
    """One module's region of a model parameter.

    storage:    the parameter's tensor, in its own layout
    transposed: True when ``storage`` is [h_in, h_out] (``Linear.weight_t``, the embedding's [vocab, hidden],
                a transposed LM head); False when it is [h_out, h_in]
    offset, width: the module's output columns inside a fused projection (q/k/v, gate/up); 0 and h_out else
    bias:       the module's own bias slice [h_out], or None
    """

    name: str
    storage: torch.Tensor
    transposed: bool
    offset: int
    width: int
    bias: torch.Tensor | None

    def region(self) -> torch.Tensor:
        """A view of this module's elements in the storage layout (writes go through to the model)."""
        if self.transposed:
            return self.storage[:, self.offset : self.offset + self.width]
        return self.storage[self.offset : self.offset + self.width]

    def weight(self) -> torch.Tensor:
        """The module's weight as PEFT sees it: [h_out, h_in] (a view, not a copy)."""
        region = self.region()
        return region.t() if self.transposed else region


def _plain(module: nn.Module, kind: type[_Block], name: str) -> _Block:
    """The plain block under any LoRA wrappers; ``FailedPrecondition`` unless it is exactly ``kind``."""
    for _ in range(_MAX_WRAPPERS):
        if isinstance(module, kind) and type(module) is kind:  # subclasses (quantized twins) are not plain
            return module
        inner = getattr(module, "base", None)
        if not isinstance(inner, nn.Module):
            break
        module = inner
    raise FailedPrecondition(
        f"{name} is a {type(module).__name__}, not a plain {kind.__name__} with dense weights "
        "(a quantized base model cannot have an adapter folded into it)",
        reason="BASE_NOT_DENSE",
    )


def locate(model: CausalLM, key: ModuleKey) -> WeightSlice:
    """The weight of PEFT module ``key`` = (layer, module) inside ``model``; raises ``FailedPrecondition``."""
    layer, module = key
    if layer is None:
        if module == "embed_tokens":
            emb = _plain(model.embed_tokens, Embedding, "embed_tokens")
            weight = emb.weight  # [vocab, hidden] = [h_in, h_out] of ΔW = B·A [hidden, vocab]
            return WeightSlice("embed_tokens", weight, True, 0, int(weight.shape[1]), None)
        if module == "lm_head":
            head = _plain(model.lm_head, LMHead, "lm_head")
            storage = head.head  # [hidden, vocab] when transposed, else [vocab, hidden]
            width = int(storage.shape[1] if head.transposed else storage.shape[0])
            return WeightSlice("lm_head", storage, head.transposed, 0, width, None)
        raise FailedPrecondition(f"module {module!r} needs a layer index")
    if not 0 <= layer < len(model.layers):
        raise FailedPrecondition(f"layer {layer} is out of range: the model has {len(model.layers)} layers")
    block = model.layers[layer]
    parent = block.self_attn if module in ATTENTION_MODULES else block.mlp
    for attr, parts in fused_slices(model.args).items():
        names = [name for name, _ in parts]
        if module not in names:
            continue
        name = f"layers.{layer}.{attr}"
        linear = _plain(getattr(parent, attr), Linear, name)
        total = int(linear.weight_t.shape[1])
        i = names.index(module)
        offset = parts[i][1]
        end = parts[i + 1][1] if i + 1 < len(parts) else total
        bias = None if linear.bias is None else linear.bias[offset:end]
        return WeightSlice(f"{name}[{module}]", linear.weight_t, True, offset, end - offset, bias)
    raise FailedPrecondition(f"module {module!r} is not a projection of this model")


def _output_width(model: CausalLM, module: str) -> int:
    args = model.args
    widths = {
        "q_proj": args.num_heads * args.head_dim,
        "k_proj": args.num_kv_heads * args.head_dim,
        "v_proj": args.num_kv_heads * args.head_dim,
        "o_proj": args.hidden_size,
        "gate_proj": args.intermediate_size,
        "up_proj": args.intermediate_size,
        "down_proj": args.hidden_size,
    }
    return widths[module]


def projection(model: CausalLM, layer: int, module: str) -> tuple[nn.Module, int, int]:
    """(the fused projection block under any LoRA wrapper, offset, width) of PEFT module (layer, module).

    Unlike ``locate`` this accepts any block answering ``dequantized_weight()`` (plain or quantized): what DoRA's
    per-column norm needs is the weight as computed, not a tensor to write into.
    """
    block = model.layers[layer]
    parent = block.self_attn if module in ATTENTION_MODULES else block.mlp
    for attr, parts in fused_slices(model.args).items():
        offsets = dict(parts)
        if module not in offsets:
            continue
        fused: nn.Module = getattr(parent, attr)
        for _ in range(_MAX_WRAPPERS):
            if hasattr(fused, "dequantized_weight"):
                return fused, offsets[module], _output_width(model, module)
            inner = getattr(fused, "base", None)
            if not isinstance(inner, nn.Module):
                break
            fused = inner
        raise FailedPrecondition(f"layers.{layer}.{attr} has no readable weight", reason="BASE_NOT_DENSE")
    raise FailedPrecondition(f"module {module!r} is not a projection of this model")


def dense_weight(model: CausalLM, key: ModuleKey) -> torch.Tensor:
    """[h_out, h_in] weight of decoder module ``key`` as the forward pass uses it (dequantized when quantized)."""
    layer, module = key
    if layer is None:
        raise FailedPrecondition(f"{module} has no decoder-layer weight")
    fused, offset, width = projection(model, layer, module)
    read: Callable[[], torch.Tensor] = fused.dequantized_weight  # type: ignore[assignment]
    return read()[offset : offset + width]
