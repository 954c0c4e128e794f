"""Read a Hugging Face checkpoint folder into validated tensors on the device (single file or sharded index).

Why validate every tensor against shapes computed from config.json before building anything: a truncated or
mismatched checkpoint must fail at load with the tensor's name, not as a shape error deep inside a forward pass
minutes later.

Quantized bases: the seven projections of every layer (q/k/v/o, gate/up/down) are the only tensors quantized;
embeddings, norms, biases and lm_head stay in the serving dtype. A projection is either read packed from a
checkpoint that transformers + bitsandbytes saved quantized, or quantized here (``--quantization nf4|int8``)
one tensor at a time on the target device, after the cast to the serving dtype (as transformers casts before
bitsandbytes quantizes), so the full-precision model never has to fit anywhere at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from loraplex.engine.model.args import ModelArgs
from loraplex.engine.model.errors import ModelLoadError
from loraplex.engine.model.quant_checkpoint import METHODS, is_quantized, read_int8, read_nf4
from loraplex.engine.model.quant_int8 import quantize_int8
from loraplex.engine.model.quant_linear import QuantizedTensors, WeightLike
from loraplex.engine.model.quant_nf4 import quantize_nf4

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(requested: str, args: ModelArgs) -> torch.dtype:
    """With "auto", follow the checkpoint's declared dtype (float32 when it declares something unknown)."""
    if requested == "auto":
        return _DTYPES.get(args.torch_dtype, torch.float32)
    return _DTYPES[requested]


def projection_names(args: ModelArgs) -> list[str]:
    """The checkpoint names of the linear weights a quantized base stores packed (7 per layer)."""
    attention = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    modules = (*attention, "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    return [f"model.layers.{i}.{m}.weight" for i in range(args.num_layers) for m in modules]


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor the forward pass reads, by checkpoint name, with its shape."""
    h, d = args.hidden_size, args.head_dim
    q_out, kv_out, inter = args.num_heads * d, args.num_kv_heads * d, args.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (args.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not args.tie_word_embeddings:
        shapes["lm_head.weight"] = (args.vocab_size, h)
    for i in range(args.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        for name, out in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
            shapes[p + f"self_attn.{name}.weight"] = (out, h)
            if args.qkv_bias:
                shapes[p + f"self_attn.{name}.bias"] = (out,)
        shapes[p + "self_attn.o_proj.weight"] = (h, q_out)
        if args.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        for name, shape in (("gate_proj", (inter, h)), ("up_proj", (inter, h)), ("down_proj", (h, inter))):
            shapes[p + f"mlp.{name}.weight"] = shape
            if args.mlp_bias:
                shapes[p + f"mlp.{name}.bias"] = (shape[0],)
    return shapes


def _weight_files(model_dir: Path) -> dict[str, Path]:
    """Map tensor name -> file holding it, from the shard index or the single ``model.safetensors``."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{index}: malformed shard index ({exc})") from exc
        files = {name: model_dir / str(file) for name, file in weight_map.items()}
        for path in set(files.values()):
            if not path.is_file():
                raise ModelLoadError(f"{index}: shard {path.name} is missing")
        return files
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise ModelLoadError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
    with safe_open(str(single), framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


class _Checkpoint:
    """Every shard open at once, read by tensor name (a quantized module's tensors may span shards)."""

    def __init__(self, files: dict[str, Path], handles: dict[Path, Any]) -> None:
        self.files = files
        self.handles = handles

    def has(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise ModelLoadError(f"checkpoint is missing tensor {name}")
        tensor: torch.Tensor = self.handles[self.files[name]].get_tensor(name)
        return tensor

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.handles[self.files[name]].get_slice(name).get_shape())


@contextmanager
def _open_checkpoint(model_dir: Path) -> Iterator[_Checkpoint]:
    files = _weight_files(model_dir)
    with ExitStack() as stack:
        handles = {path: stack.enter_context(safe_open(str(path), framework="pt")) for path in set(files.values())}
        yield _Checkpoint(files, handles)


@dataclass(frozen=True)
class ModelWeights:
    """Tensors by checkpoint name, on the device: dense ones in the serving dtype, quantized projections packed."""

    dense: dict[str, torch.Tensor]
    quantized: dict[str, QuantizedTensors]
    quantization: str  # what the projections are: "none", "nf4" or "int8"
    dtype: torch.dtype  # the serving (compute) dtype

    def projection(self, name: str) -> WeightLike:
        quantized = self.quantized.get(name)
        return self.dense[name] if quantized is None else quantized


def _resolve_method(requested: str, saved: str) -> str:
    """A quantized checkpoint loads as saved; a flag may only repeat its method (or quantize a dense one)."""
    if requested not in METHODS:
        raise ModelLoadError(f"quantization must be one of {METHODS}, got {requested!r}")
    if saved != "none" and requested not in ("none", saved):
        raise ModelLoadError(
            f"checkpoint is already quantized (bitsandbytes {saved}); it cannot be served as {requested}: "
            f"drop --quantization or pass {saved}"
        )
    return saved if saved != "none" else requested


def _read_saved(ckpt: _Checkpoint, method: str, name: str, shape: tuple[int, ...]) -> QuantizedTensors:
    n_out, n_in = shape
    if method == "nf4":
        return read_nf4(ckpt.get, name, (n_out, n_in))
    return read_int8(ckpt.get, ckpt.has, name, (n_out, n_in))


def _quantize(method: str, weight: torch.Tensor) -> QuantizedTensors:
    return quantize_nf4(weight) if method == "nf4" else quantize_int8(weight)


def load_weights(
    model_dir: Path, args: ModelArgs, dtype: torch.dtype, device: torch.device, quantization: str = "none"
) -> ModelWeights:
    """Every expected tensor, checked for presence and shape, on ``device``; extras are ignored.

    ``quantization`` ("none", "nf4", "int8") quantizes the projections of an unquantized checkpoint; a
    checkpoint saved quantized loads as saved whatever the flag says, unless the flag names another method.
    """
    method = _resolve_method(quantization, args.checkpoint_quantization)
    saved = args.checkpoint_quantization != "none"
    shapes = expected_shapes(args)
    projections = set(projection_names(args))
    dense: dict[str, torch.Tensor] = {}
    quantized: dict[str, QuantizedTensors] = {}
    with _open_checkpoint(model_dir) as ckpt:
        missing = [name for name in shapes if not ckpt.has(name)]
        if missing:
            shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
            raise ModelLoadError(f"{model_dir}: checkpoint is missing tensor(s): {shown}")
        for name, want in shapes.items():
            if saved and name in projections and is_quantized(method, name, ckpt.has):
                quantized[name] = _read_saved(ckpt, method, name, want).to(device)
                continue
            shape = ckpt.shape(name)
            if shape != want:
                raise ModelLoadError(
                    f"{ckpt.files[name].name}: tensor {name} has shape {list(shape)}, expected {list(want)}"
                )
            tensor = ckpt.get(name).to(dtype).to(device)
            if not saved and method != "none" and name in projections:
                quantized[name] = _quantize(method, tensor)
            else:
                dense[name] = tensor
    return ModelWeights(dense, quantized, method, dtype)
