"""``HostAdapter``: a PEFT LoRA adapter parsed, validated and held in host memory, ready to copy into the pool.

Why validate with the registry's torch-free helpers: key grammar, rank/alpha patterns and rsLoRA scaling have
ONE definition (``loraplex.registry.peft_format``), shared by upload-time checks and this load-time parse.

PEFT writes ``embed_tokens.base_layer.weight`` / ``lm_head.base_layer.weight`` copies when embeddings are
targeted (its ``save_embedding_layers="auto"`` guards against resized vocabularies). We skip them: the engine
serves one base model whose embedding the adapter was validated against (same vocab and hidden shapes), and a
per-adapter copy of a [vocab, hidden] matrix would cost more pool memory than the whole LoRA.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from loraplex.engine.adapters.types import ModuleKey, ModuleLoRA
from loraplex.registry.errors import InvalidAdapter
from loraplex.registry.peft_format import parse_adapter_config, parse_lora_key, validate_adapter
from loraplex.registry.spec import ModelSpec
from loraplex.registry.weights_check import check_weights_bytes

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass(frozen=True)
class HostAdapter:
    """Per (layer, module): A [r, h_in], B [h_out, r] (PEFT orientation), rank and scale; host memory."""

    modules: Mapping[ModuleKey, ModuleLoRA]
    rank: int  # the largest module rank

    @property
    def dora(self) -> bool:
        """Whether this is a DoRA adapter (every module then carries its magnitude)."""
        return any(m.magnitude is not None for m in self.modules.values())

    @property
    def nbytes(self) -> int:
        total = 0
        for m in self.modules.values():
            total += m.a.numel() * m.a.element_size() + m.b.numel() * m.b.element_size()
            if m.magnitude is not None:
                total += m.magnitude.numel() * m.magnitude.element_size()
        return total

    @classmethod
    def from_bytes(cls, config_json: str, weights: bytes, spec: ModelSpec, max_rank: int) -> HostAdapter:
        """Parse ``adapter_config.json`` text + ``adapter_model.safetensors`` bytes; raise typed errors."""
        config = parse_adapter_config(config_json)
        # The registry's upload rules, again: adapters stored before a rule existed must not reach the pool either
        # (a NaN weight would poison every token of the adapter; a bad layout the loader would refuse anyway).
        header = check_weights_bytes(weights).tensors
        validate_adapter(config, header, spec, max_rank, allow_dora=True)
        tensors = load_safetensors(weights)
        pairs: dict[ModuleKey, dict[str, torch.Tensor]] = {}
        for name, tensor in tensors.items():
            key = parse_lora_key(name)
            if key.part == "base_layer":
                continue  # see the module docstring
            part = {"A": "a", "embedding_A": "a", "magnitude": "m"}.get(key.part, "b")
            pairs.setdefault((key.layer, key.module), {})[part] = tensor
        modules: dict[ModuleKey, ModuleLoRA] = {}
        for (layer, module), pair in pairs.items():
            if not {"a", "b"} <= set(pair):
                raise InvalidAdapter(f"{module} (layer {layer}) needs both LoRA A and B tensors")
            magnitude = pair.get("m")
            if config.use_dora != (magnitude is not None):
                raise InvalidAdapter(f"{module} (layer {layer}): a magnitude vector belongs to DoRA adapters only")
            modules[(layer, module)] = ModuleLoRA(
                a=pair["a"].contiguous(),
                b=pair["b"].contiguous(),
                scale=config.scale_for(module, layer),
                magnitude=None if magnitude is None else magnitude.float().contiguous(),
            )
        return cls(modules=modules, rank=max(m.rank for m in modules.values()))

    @classmethod
    def from_peft_dir(cls, path: Path | str, spec: ModelSpec, max_rank: int) -> HostAdapter:
        """Load a folder written by PEFT's ``save_pretrained`` (safetensors only)."""
        folder = Path(path)
        config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        for required in (config_path, weights_path):
            if not required.is_file():
                raise InvalidAdapter(f"{folder}: {required.name} not found")
        return cls.from_bytes(config_path.read_text(), weights_path.read_bytes(), spec, max_rank)
