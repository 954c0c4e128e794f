"""DoRA (weight-decomposed LoRA) at inference: PEFT's magnitude vectors and the per-column factor they imply.

The math, as PEFT 0.21 runs it (``peft/tuners/lora/dora.py`` ``DoraLinearLayer.forward`` with the
``DoraLinearVariant`` passing the base layer's output in; eval mode, no dropout):

    ΔW   = B·A                                  (``get_lora_weight``: B(A(I))ᵀ, in the adapter dtype)
    n    = ‖W + s·ΔW‖₂ over each output row     (``get_weight_norm``: ``torch.linalg.norm(.., dim=1)``,
                                                  W and ΔW cast to the input dtype, detached)
    f    = m / n                                (``mag_norm_scale``; m = ``lora_magnitude_vector``, [h_out])
    y    = base(x) + (f - 1)·(base(x) - bias) + f·s·B·A·x
         = f ⊙ (W·x + s·B·A·x) + bias           (the bias stays OUTSIDE the scaling)

so the factor ``f`` [h_out] depends only on the base weight and the adapter: compute it once per (adapter,
module) when the adapter reaches the device, then per token scale the module's output columns (minus bias).
PEFT calls the norm "column-wise" because its ΔW is taken as [h_out, h_in]: one number per OUTPUT feature.

PEFT computes ``n`` in the input's dtype; ``dora_column_factor`` always computes in float32 and returns float32
(identical to PEFT for fp32 serving; closer to the real norm than PEFT's own bf16/fp16 run otherwise).

Embeddings (``DoraEmbeddingLayer``) follow the same formula with W = Eᵀ ([hidden, vocab]), no bias: pass
``locate(model, (None, "embed_tokens")).weight()``; the factor is then per hidden feature.

Key names (PEFT ``save_pretrained``, its ``_get_adapter_state_dict`` strips the DoraLinearLayer's ``.weight``):
``base_model.model.model.layers.{i}.self_attn.q_proj.lora_magnitude_vector`` (1-D, [h_out]), and likewise
``base_model.model.model.embed_tokens.lora_magnitude_vector`` / ``base_model.model.lm_head.lora_magnitude_vector``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from loraplex.engine.adapters.base_weights import locate
from loraplex.engine.adapters.types import ModuleKey, ModuleLoRA
from loraplex.engine.model.llama import CausalLM
from loraplex.registry.errors import AdapterIncompatible, InvalidAdapter
from loraplex.registry.peft_format import lora_key, parse_lora_key

MAGNITUDE_SUFFIX = "lora_magnitude_vector"


def magnitude_key(module: str, layer: int | None) -> str:
    """The safetensors key PEFT writes for a module's DoRA magnitude; inverse of ``parse_magnitude_key``."""
    return lora_key(module, layer, "base_layer").removesuffix("base_layer.weight") + MAGNITUDE_SUFFIX


def parse_magnitude_key(name: str) -> ModuleKey | None:
    """(layer, module) of a DoRA magnitude key; None for every other key.

    Why via ``parse_lora_key``: the module grammar (which paths exist, which are supported) has one definition;
    a magnitude key is a LoRA key with another leaf, so the sibling A key is parsed instead. Raises like it
    (``AdapterIncompatible`` for an unsupported module, ``InvalidAdapter`` for a malformed path).
    """
    if not name.endswith("." + MAGNITUDE_SUFFIX):
        return None
    stem = name[: -len(MAGNITUDE_SUFFIX)]
    leaf = "lora_embedding_A" if stem.endswith(".embed_tokens.") else "lora_A.weight"
    key = parse_lora_key(stem + leaf)
    return key.layer, key.module


def split_dora_tensors(
    tensors: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[ModuleKey, torch.Tensor]]:
    """Separate PEFT's magnitude vectors from the LoRA tensors of one adapter file.

    Returns (the remaining tensors by key, as ``HostAdapter`` parses them; magnitudes by (layer, module)).
    """
    rest: dict[str, torch.Tensor] = {}
    magnitudes: dict[ModuleKey, torch.Tensor] = {}
    for name, tensor in tensors.items():
        key = parse_magnitude_key(name)
        if key is None:
            rest[name] = tensor
        else:
            magnitudes[key] = tensor
    return rest, magnitudes


def validate_magnitudes(magnitudes: Mapping[ModuleKey, torch.Tensor], modules: Mapping[ModuleKey, ModuleLoRA]) -> None:
    """Every LoRA module of a DoRA adapter has one finite magnitude of shape [h_out], and nothing else has one.

    PEFT gives every module it wraps with ``use_dora=True`` a magnitude, so a missing one means a damaged file,
    not a module that runs as plain LoRA. Raises ``InvalidAdapter`` naming the tensor.
    """
    for key in magnitudes:
        if key not in modules:
            raise InvalidAdapter(f"tensor {magnitude_key(key[1], key[0])!r} has no LoRA A/B pair for its module")
    for key, lora in modules.items():
        name = magnitude_key(key[1], key[0])
        m = magnitudes.get(key)
        if m is None:
            raise InvalidAdapter(f"tensor {name!r} is missing: a DoRA adapter needs a magnitude for every module")
        h_out = int(lora.b.shape[0])
        if tuple(m.shape) != (h_out,):
            raise InvalidAdapter(f"tensor {name!r} has shape {list(m.shape)}, expected [{h_out}]")
        if not bool(torch.isfinite(m).all()):
            raise InvalidAdapter(f"tensor {name!r} holds non-finite values")


def dora_column_factor(
    weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, magnitude: torch.Tensor
) -> torch.Tensor:
    """f = m / ‖W + s·B·A‖ per output row, float32 [h_out]; y = f ⊙ (W·x + s·B·A·x) + bias equals PEFT.

    weight: [h_out, h_in] base weight (any float dtype/device; the UNMERGED base — see ``merge``)
    a: [r, h_in], b: [h_out, r], scale: s, magnitude: [h_out]

    Raises ``AdapterIncompatible`` when a row of W + s·B·A is all zeros (PEFT would divide by zero and emit
    NaN/inf for that feature; refusing is the honest answer).
    """
    delta = b.to(weight.device, torch.float32) @ a.to(weight.device, torch.float32)  # [h_out, h_in]
    norm: torch.Tensor = torch.linalg.norm(weight.float() + scale * delta, dim=1)  # [h_out]
    factor = magnitude.to(weight.device, torch.float32) / norm
    if not bool(torch.isfinite(factor).all()):
        raise AdapterIncompatible("DoRA weight norm is zero for some output feature of this base model")
    return factor


def dora_factors(
    model: CausalLM,
    modules: Mapping[ModuleKey, ModuleLoRA],
    magnitudes: Mapping[ModuleKey, torch.Tensor],
    unmerged: Mapping[ModuleKey, torch.Tensor] | None = None,
) -> dict[ModuleKey, torch.Tensor]:
    """The float32 factor [h_out] of every module of a DoRA adapter against ``model``'s base weights.

    ``unmerged`` ([h_out, h_in] per module, e.g. ``MergedAdapter.originals``) overrides the model's
    weights: while another adapter is merged into the base, DoRA's norm must still see the ORIGINAL W, since
    PEFT's oracle for every other row is the unmerged model.
    """
    validate_magnitudes(magnitudes, modules)
    out: dict[ModuleKey, torch.Tensor] = {}
    for key, lora in modules.items():
        weight = unmerged[key] if unmerged is not None and key in unmerged else locate(model, key).weight()
        out[key] = dora_column_factor(weight, lora.a, lora.b, lora.scale, magnitudes[key])
    return out


def apply_dora_factor(y: torch.Tensor, factor: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The reference per-token step: y [T, h_out] = W·x + bias + s·B·A·x  →  f ⊙ (y - bias) + bias.

    Written as ``f·y + (1 - f)·bias`` it is one multiply-add per element, with ``(1 - f)·bias`` computable once
    per adapter; any other deltas a token carries (e.g. a merged adapter's negated delta) must already be in
    ``y``, because PEFT scales W·x + s·B·A·x of the UNMERGED base.
    """
    f = factor.to(y.dtype)
    if bias is None:
        return y * f
    return (y - bias) * f + bias
