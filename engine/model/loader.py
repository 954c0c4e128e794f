"""Read a Hugging Face checkpoint folder into validated tensors (single file or sharded index).

Why validate every tensor against shapes computed from config.json before building anything: a truncated or
mismatched checkpoint must fail at load with the tensor's name, not as a shape error deep inside a forward pass
minutes later.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from loraplex.engine.model.args import ModelArgs
from loraplex.engine.model.errors import ModelLoadError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(requested: str, args: ModelArgs) -> torch.dtype:
    """With "auto", follow the checkpoint's declared dtype (float32 when it declares something unknown)."""
    if requested == "auto":
        return _DTYPES.get(args.torch_dtype, torch.float32)
    return _DTYPES[requested]


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


def load_weights(model_dir: Path, args: ModelArgs, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every expected tensor, checked for presence and shape, cast to ``dtype``; extras are ignored."""
    shapes = expected_shapes(args)
    files = _weight_files(model_dir)
    missing = [name for name in shapes if name not in files]
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise ModelLoadError(f"{model_dir}: checkpoint is missing tensor(s): {shown}")
    by_file: dict[Path, list[str]] = {}
    for name in shapes:
        by_file.setdefault(files[name], []).append(name)
    out: dict[str, torch.Tensor] = {}
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for name in names:
                shape = tuple(f.get_slice(name).get_shape())
                if shape != shapes[name]:
                    raise ModelLoadError(
                        f"{path.name}: tensor {name} has shape {list(shape)}, expected {list(shapes[name])}"
                    )
                out[name] = f.get_tensor(name).to(dtype)
    return out
