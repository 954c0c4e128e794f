"""Torch-free model spec: the module shapes of a supported base model, computed from its ``config.json``.

Why here and torch-free: the registry must reject an adapter that does not fit its base model before storing a
byte, and the engine must do the same check when it loads weights. Both call ``ModelSpec.module_shapes()`` so
there is exactly one definition of "what shape is q_proj in this model".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from loraplex.registry.errors import InvalidArgument

# model_type -> the causal-LM class name transformers writes into ``architectures``.
SUPPORTED_ARCHITECTURES: Mapping[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LINEAR_MODULES = ATTENTION_MODULES + MLP_MODULES
EMBEDDING_MODULES = ("embed_tokens", "lm_head")
ALL_MODULES = LINEAR_MODULES + EMBEDDING_MODULES

# Generous upper bounds: they only exist so a hostile config cannot make shape arithmetic absurd.
_MAX_DIM = 1 << 22
_MAX_LAYERS = 4096


def _positive_int(config: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _MAX_DIM:
        raise InvalidArgument(
            f"model config field {key!r} must be a positive integer ≤ {_MAX_DIM}, got {value!r}",
            reason="INVALID_MODEL_CONFIG",
        )
    return value


@dataclass(frozen=True)
class ModelSpec:
    """The handful of numbers that fix every LoRA-relevant shape of a Llama-family decoder."""

    architecture: str
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelSpec:
        """Build from a Hugging Face ``config.json`` dict (llama, mistral or qwen2)."""
        if not isinstance(config, Mapping):
            raise InvalidArgument("model config must be a JSON object", reason="INVALID_MODEL_CONFIG")
        model_type = config.get("model_type")
        if not isinstance(model_type, str):
            model_type = repr(model_type)
        architectures = config.get("architectures")
        if architectures is not None and (
            not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures)
        ):
            raise InvalidArgument(
                "model config field 'architectures' must be a list of strings", reason="INVALID_MODEL_CONFIG"
            )
        if model_type not in SUPPORTED_ARCHITECTURES:
            shown = architectures[0] if architectures else model_type
            raise InvalidArgument(
                f"unsupported architecture {shown!r} (model_type {model_type!r}); supported: "
                f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}",
                reason="UNSUPPORTED_ARCHITECTURE",
            )
        expected_arch = SUPPORTED_ARCHITECTURES[model_type]
        if architectures and architectures != [expected_arch]:
            raise InvalidArgument(
                f"unsupported architecture {architectures!r} for model_type {model_type!r}; "
                f"expected [{expected_arch!r}]",
                reason="UNSUPPORTED_ARCHITECTURE",
            )
        hidden = _positive_int(config, "hidden_size")
        layers = _positive_int(config, "num_hidden_layers")
        if layers > _MAX_LAYERS:
            raise InvalidArgument(f"num_hidden_layers {layers} exceeds {_MAX_LAYERS}", reason="INVALID_MODEL_CONFIG")
        heads = _positive_int(config, "num_attention_heads")
        kv_heads = _positive_int(config, "num_key_value_heads", heads)
        if heads % kv_heads:
            raise InvalidArgument(
                f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}",
                reason="INVALID_MODEL_CONFIG",
            )
        if config.get("head_dim") is not None:
            head_dim = _positive_int(config, "head_dim")
        elif hidden % heads:
            raise InvalidArgument(
                f"hidden_size {hidden} is not divisible by num_attention_heads {heads} and no head_dim is given",
                reason="INVALID_MODEL_CONFIG",
            )
        else:
            head_dim = hidden // heads
        tie = config.get("tie_word_embeddings", False)
        if not isinstance(tie, bool):
            raise InvalidArgument(
                "model config field 'tie_word_embeddings' must be a boolean", reason="INVALID_MODEL_CONFIG"
            )
        return cls(
            architecture=expected_arch,
            model_type=model_type,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=_positive_int(config, "intermediate_size"),
            vocab_size=_positive_int(config, "vocab_size"),
            tie_word_embeddings=tie,
        )

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """``(in_features, out_features)`` per module; embeddings map vocab→hidden, lm_head hidden→vocab.

        LoRA A is ``[r, in_features]`` and B is ``[out_features, r]`` for every entry, embeddings included.
        """
        q_out = self.num_attention_heads * self.head_dim
        kv_out = self.num_key_value_heads * self.head_dim
        return {
            "q_proj": (self.hidden_size, q_out),
            "k_proj": (self.hidden_size, kv_out),
            "v_proj": (self.hidden_size, kv_out),
            "o_proj": (q_out, self.hidden_size),
            "gate_proj": (self.hidden_size, self.intermediate_size),
            "up_proj": (self.hidden_size, self.intermediate_size),
            "down_proj": (self.intermediate_size, self.hidden_size),
            "embed_tokens": (self.vocab_size, self.hidden_size),
            "lm_head": (self.hidden_size, self.vocab_size),
        }
