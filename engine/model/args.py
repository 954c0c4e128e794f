"""Architecture hyper-parameters read from ``config.json`` with plain Python.

Why separate from the registry's ``ModelSpec``: the spec answers "which modules exist and with which shapes"
(what adapter validation needs); this answers "how does the forward pass behave" (rope, norms, windows,
biases), which only the engine needs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraplex.engine.model.errors import ModelLoadError
from loraplex.engine.model.quant_checkpoint import checkpoint_quantization

# model_type -> (qkv bias default, honours sliding_window)
_FAMILIES: dict[str, tuple[bool, bool]] = {"llama": (False, False), "mistral": (False, True), "qwen2": (True, True)}
_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    rope_theta: float
    rope: dict[str, Any] = field(default_factory=dict)
    # per layer: attention window in tokens, or None for full causal attention
    sliding_windows: tuple[int | None, ...] = ()
    torch_dtype: str = "float32"
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    # how the checkpoint stores its projections: "none", or "nf4" / "int8" when saved by transformers + bitsandbytes
    checkpoint_quantization: str = "none"

    @property
    def rope_type(self) -> str:
        return str(self.rope.get("rope_type", self.rope.get("type", "default")))


def _eos_list(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _rope_params(cfg: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """Normalise old (``rope_theta`` + ``rope_scaling``) and new (``rope_parameters``) config spellings."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    params.update({k: v for k, v in scaling.items() if k not in params})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = str(params.get("rope_type", params.get("type", "default")))
    if rope_type not in _ROPE_TYPES:
        raise ModelLoadError(f"config.json: unsupported rope type {rope_type!r} (supported: {_ROPE_TYPES})")
    params["rope_type"] = rope_type
    if rope_type != "default" and "factor" not in params:
        raise ModelLoadError(f"config.json: rope type {rope_type!r} needs a 'factor'")
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in params:
                raise ModelLoadError(f"config.json: llama3 rope scaling needs {key!r}")
    return theta, params


def _windows(model_type: str, cfg: dict[str, Any], num_layers: int) -> tuple[int | None, ...]:
    window = cfg.get("sliding_window")
    if model_type == "qwen2" and not cfg.get("use_sliding_window", False):
        window = None
    if window is None:
        return (None,) * num_layers
    layer_types = cfg.get("layer_types")
    if isinstance(layer_types, list) and len(layer_types) == num_layers:
        return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)
    if model_type == "qwen2":
        first = int(cfg.get("max_window_layers", 28))
        return tuple(int(window) if i >= first else None for i in range(num_layers))
    return (int(window),) * num_layers


def _int(cfg: dict[str, Any], key: str) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelLoadError(f"config.json: {key!r} must be a positive integer, got {value!r}")
    return value


def parse_model_args(cfg: dict[str, Any]) -> ModelArgs:
    """Validate a config.json dict for a supported family; raise ``ModelLoadError`` naming the problem."""
    model_type = cfg.get("model_type")
    if model_type not in _FAMILIES:
        archs = cfg.get("architectures")
        raise ModelLoadError(
            f"unsupported architecture: model_type={model_type!r} architectures={archs!r} "
            f"(supported model types: {sorted(_FAMILIES)})"
        )
    qkv_bias_default, has_window = _FAMILIES[model_type]
    if cfg.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"config.json: unsupported hidden_act {cfg.get('hidden_act')!r} (only 'silu')")
    hidden = _int(cfg, "hidden_size")
    heads = _int(cfg, "num_attention_heads")
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    if heads % kv_heads != 0:
        raise ModelLoadError(f"config.json: num_attention_heads {heads} not a multiple of kv heads {kv_heads}")
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    layers = _int(cfg, "num_hidden_layers")
    theta, rope = _rope_params(cfg)
    attention_bias = bool(cfg.get("attention_bias", qkv_bias_default))
    return ModelArgs(
        model_type=str(model_type),
        vocab_size=_int(cfg, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_int(cfg, "intermediate_size"),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=attention_bias,
        o_bias=attention_bias and model_type == "llama",
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        rope_theta=theta,
        rope=rope,
        sliding_windows=_windows(str(model_type), cfg, layers) if has_window else (None,) * layers,
        torch_dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"),
        eos_token_ids=_eos_list(cfg.get("eos_token_id")),
        bos_token_id=cfg.get("bos_token_id"),
        checkpoint_quantization=checkpoint_quantization(cfg),
    )


def read_model_args(model_dir: Path) -> ModelArgs:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{path}: config.json not found")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return parse_model_args(cfg)
