"""Fold one (hot) adapter into the base weights, and undo it bit-exactly.

Merged:   W' = W + s·B·A for every module the adapter adapts, written in place into the model's parameters (the
          fused ``qkv_proj`` / ``gate_up_proj`` columns, ``Linear.weight_t`` transposed — see ``base_weights``),
          computed in float32 and rounded ONCE to the serving dtype. Equal to PEFT ``merge_and_unload`` (which
          adds ``(B @ A) * scaling`` in the adapter dtype) exactly in fp32, and within one rounding otherwise.
Others:   every other row must still see W: it runs ``MergedAdapter.negated`` — the same A, B negated, same scale,
          i.e. -s·B·A of rank r — as an extra LoRA slice before its own adapter (and before a DoRA factor).
          W'·x - s·B·A·x equals W·x up to float rounding (not bit-exactly).
Unmerge:  copies the saved original regions back (host-memory copies, not a subtraction), so W returns
          bit-for-bit.

Refused with ``FailedPrecondition``: a projection that is not a plain ``Linear`` (a quantized base has no dense
weight), and embed_tokens / lm_head of a model with tied embeddings (one tensor backs both, so folding one LoRA
would change the other). Plain LoRA only: a DoRA adapter's merged weight f⊙(W + s·B·A) has no rank-r negation,
so the caller must refuse merging DoRA adapters.

All-or-nothing: every module is located and checked before the first write, and a failure while writing restores
the modules already written. The caller owns "at most one merged adapter" and must not run steps concurrently.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from loraplex.engine.adapters.base_weights import WeightSlice, locate
from loraplex.engine.adapters.types import ModuleKey, ModuleLoRA
from loraplex.engine.model.llama import CausalLM
from loraplex.registry.errors import AdapterIncompatible, FailedPrecondition


@dataclass(frozen=True)
class MergedAdapter:
    """What ``merge_adapter`` changed.

    originals: per module, its weight before the merge as [h_out, h_in] (a view of a contiguous host copy in the
               model's storage layout; only the merged modules' regions are kept, not whole fused matrices)
    negated:   per module, ModuleLoRA(a, -b, scale): the delta other rows run to undo the merge (rank r)
    """

    originals: Mapping[ModuleKey, torch.Tensor]
    negated: Mapping[ModuleKey, ModuleLoRA]

    @property
    def nbytes(self) -> int:
        """Host memory held by the saved originals."""
        return sum(t.numel() * t.element_size() for t in self.originals.values())


def negated_delta(modules: Mapping[ModuleKey, ModuleLoRA]) -> dict[ModuleKey, ModuleLoRA]:
    """-s·B·A per module as a LoRA of the same rank: B negated (exact in floating point), A and s shared."""
    return {key: ModuleLoRA(lora.a, -lora.b, lora.scale) for key, lora in modules.items()}


def _checked_slices(model: CausalLM, modules: Mapping[ModuleKey, ModuleLoRA]) -> dict[ModuleKey, WeightSlice]:
    slices: dict[ModuleKey, WeightSlice] = {}
    for key, lora in modules.items():
        if key[0] is None and model.args.tie_word_embeddings:
            raise FailedPrecondition(
                f"cannot merge a LoRA of {key[1]} into a model with tied embeddings (embed_tokens and lm_head "
                "share one weight)",
                reason="TIED_EMBEDDINGS",
            )
        sl = locate(model, key)
        want = (int(lora.b.shape[0]), int(lora.a.shape[1]))
        if tuple(sl.weight().shape) != want or lora.a.shape[0] != lora.b.shape[1]:
            raise AdapterIncompatible(
                f"{sl.name} has weight shape {list(sl.weight().shape)}, the adapter's B·A is {list(want)}"
            )
        slices[key] = sl
    return slices


def _save(sl: WeightSlice) -> torch.Tensor:
    """A contiguous host copy of the module's region, returned as its [h_out, h_in] view."""
    region = sl.region()
    saved = torch.empty(tuple(region.shape), dtype=region.dtype, device="cpu")
    saved.copy_(region)
    return saved.t() if sl.transposed else saved


def merge_adapter(model: CausalLM, modules: Mapping[ModuleKey, ModuleLoRA]) -> MergedAdapter:
    """Fold ``modules`` (a plain LoRA adapter's modules) into ``model`` in place; see the module docstring."""
    if not modules:
        raise FailedPrecondition("the adapter to merge adapts no module")
    slices = _checked_slices(model, modules)
    originals = {key: _save(sl) for key, sl in slices.items()}
    written: list[ModuleKey] = []
    try:
        with torch.no_grad():
            for key, sl in slices.items():
                lora, weight = modules[key], sl.weight()  # weight: [h_out, h_in] view into the model
                delta = (lora.b.to(weight.device, torch.float32) @ lora.a.to(weight.device, torch.float32)) * lora.scale
                written.append(key)
                weight.copy_((weight.float() + delta).to(weight.dtype))
    except BaseException:
        _restore(slices, originals, written)
        raise
    return MergedAdapter(originals=originals, negated=negated_delta(modules))


def _restore(
    slices: Mapping[ModuleKey, WeightSlice], originals: Mapping[ModuleKey, torch.Tensor], keys: list[ModuleKey]
) -> None:
    with torch.no_grad():
        for key in keys:
            slices[key].weight().copy_(originals[key])


def unmerge_adapter(model: CausalLM, merged: MergedAdapter) -> None:
    """Put every merged module's original weight back, bit for bit (a copy, never a subtraction)."""
    slices = {key: locate(model, key) for key in merged.originals}
    _restore(slices, merged.originals, list(merged.originals))
