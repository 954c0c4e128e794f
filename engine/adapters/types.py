"""What the device pool needs from an adapter, independent of where it was parsed from."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# (layer index, module name); layer is None for the model-level modules embed_tokens and lm_head.
ModuleKey = tuple[int | None, str]


@dataclass(frozen=True)
class ModuleLoRA:
    """One module's low-rank pair, in PEFT's orientation.

    a: [r, h_in]  (for embed_tokens: [r, vocab], PEFT's ``lora_embedding_A``)
    b: [h_out, r] (for embed_tokens: [hidden, r], PEFT's ``lora_embedding_B``)
    magnitude: [h_out] for a DoRA module (PEFT's ``lora_magnitude_vector``), else None
    """

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    magnitude: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])
