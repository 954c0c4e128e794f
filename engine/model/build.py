"""From a Hugging Face folder to a ready model: config, weights (optionally quantized), tokenizer, EOS ids.

Every failure is a ``ModelLoadError`` naming the file, field or tensor at fault.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from loraplex.engine.model.args import ModelArgs, read_model_args
from loraplex.engine.model.errors import ModelLoadError
from loraplex.engine.model.llama import CausalLM
from loraplex.engine.model.loader import load_weights, resolve_dtype
from loraplex.engine.model.readable import check_model_folder_readable
from loraplex.engine.model.rope import RotaryTable
from loraplex.registry.errors import InvalidArgument
from loraplex.registry.spec import ModelSpec


@dataclass(frozen=True)
class LoadedModel:
    args: ModelArgs
    spec: ModelSpec
    model: CausalLM
    tokenizer: Tokenizer
    eos_token_ids: tuple[int, ...]
    dtype: torch.dtype
    max_model_len: int
    quantization: str = "none"  # how the base projections are held: "none", "nf4" or "int8"

    @property
    def weight_bytes(self) -> int:
        """Bytes the base model's weights occupy on the device (quantized parts at their packed size).

        What the KV cache and adapter pool can be sized from: device memory minus this. Storage shared between
        tensors (views, a tied head that reuses the embedding) counts once.
        """
        seen: dict[int, int] = {}
        for t in [*self.model.parameters(), *self.model.buffers()]:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return sum(seen.values())


def _eos_ids(model_dir: Path, args: ModelArgs) -> tuple[int, ...]:
    """generation_config.json's EOS ids when present (what ``generate`` stops on), else config.json's."""
    path = model_dir / "generation_config.json"
    if path.is_file():
        try:
            value = json.loads(path.read_text()).get("eos_token_id")
        except (json.JSONDecodeError, AttributeError) as exc:
            raise ModelLoadError(f"{path}: malformed generation config ({exc})") from exc
        if isinstance(value, int) and not isinstance(value, bool):
            return (value,)
        if isinstance(value, list) and all(isinstance(v, int) for v in value):
            return tuple(value)
    return args.eos_token_ids


def load_model(
    model_dir: Path, dtype_name: str, device: torch.device, max_model_len: int | None, quantization: str = "none"
) -> LoadedModel:
    check_model_folder_readable(model_dir)
    args = read_model_args(model_dir)
    try:
        spec = ModelSpec.from_config(json.loads((model_dir / "config.json").read_text()))
    except InvalidArgument as exc:
        raise ModelLoadError(f"{model_dir / 'config.json'}: {exc.message}") from exc
    tokenizer_path = model_dir / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise ModelLoadError(f"{model_dir}: tokenizer.json not found")
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    except Exception as exc:  # the tokenizers library raises plain Exception subclasses
        raise ModelLoadError(f"{tokenizer_path}: cannot be parsed ({exc})") from exc
    dtype = resolve_dtype(dtype_name, args)
    weights = load_weights(model_dir, args, dtype, device, quantization)
    length = max_model_len or args.max_position_embeddings
    model = CausalLM(args, weights, RotaryTable(args, length, device, dtype))
    eos = _eos_ids(model_dir, args)
    return LoadedModel(args, spec, model, tokenizer, eos, dtype, length, weights.quantization)
