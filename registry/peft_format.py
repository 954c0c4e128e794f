"""PEFT LoRA adapter format: ``adapter_config.json``, tensor-key grammar, validation against a spec.

Why one module: the registry (on upload) and the engine (on load) must agree exactly on which tensor belongs
to which (layer, module), what rank and scale each module has, and which adapters fit a base model. All of it
is pure functions of bytes/JSON plus a ``ModelSpec``; nothing touches torch, disk or the network.

Pattern semantics follow PEFT: ``rank_pattern``/``alpha_pattern`` keys are regexes matched against the
module's full name (``model.layers.3.self_attn.q_proj``) with ``(.*\\.)?(key)$``; the first matching key wins.
``target_modules`` as a list matches a full name exactly or by ``.<entry>`` suffix; as a string it is a regex
that must match the full name; ``layers_to_transform`` restricts list targets to those layer indices.

DoRA (``use_dora: true``) adds one ``lora_magnitude_vector`` tensor ``[out_features]`` per adapted linear module;
it is validated like A and B. DoRA on ``embed_tokens`` / ``lm_head`` is refused: the engine does not serve it.

Scales are bounded (``MAX_LORA_SCALE``): a scale is a plain float the engine multiplies into every token's LoRA
output, so an absurd one (``lora_alpha = 1e308``) can only overflow the serving dtype, never adapt anything.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from loraplex.registry.errors import AdapterIncompatible, InvalidAdapter
from loraplex.registry.safetensors_header import TensorInfo, parse_safetensors_header
from loraplex.registry.spec import (
    ALL_MODULES,
    ATTENTION_MODULES,
    LINEAR_MODULES,
    MLP_MODULES,
    ModelSpec,
)

__all__ = [
    "MAX_LORA_SCALE",
    "AdapterSummary",
    "LoraConfigInfo",
    "LoraKey",
    "TensorInfo",
    "lora_key",
    "module_path",
    "parse_adapter_config",
    "parse_lora_key",
    "parse_safetensors_header",
    "resolve_targets",
    "validate_adapter",
]

LoraPart = Literal["A", "B", "embedding_A", "embedding_B", "base_layer", "magnitude"]
ALLOWED_DTYPES = ("F32", "F16", "BF16")
ALL_LINEAR_SHORTHAND = "all-linear"
_MAX_PATTERN_LEN = 256
_PREFIX = "base_model.model."
# The largest |scale| (alpha / r, or alpha / sqrt(r) with rsLoRA, per module after rank/alpha patterns) accepted.
# Why 1e4: published recipes stay within ~0.25..64 (rsLoRA with a large alpha), so 1e4 leaves two orders of
# magnitude of headroom for odd but real choices, while scale x (B A x) stays far from the float16 limit (65504)
# for any sane weights and from the float32 limit (3.4e38) that ``lora_alpha = 1e308`` overflowed in the engine.
MAX_LORA_SCALE = 1e4
MAGNITUDE_SUFFIX = "lora_magnitude_vector"

_LAYER_KEY_RE = re.compile(
    r"^base_model\.model\.model\.layers\.(?P<layer>0|[1-9][0-9]{0,5})\.(?P<path>[A-Za-z0-9_.]+?)"
    r"\.(?:lora_(?P<part>A|B)\.weight|(?P<magnitude>lora_magnitude_vector))$"
)
_EMBED_KEY_RE = re.compile(
    r"^base_model\.model\.model\.embed_tokens\."
    r"(?:lora_embedding_(?P<part>A|B)|(?P<base>base_layer\.weight)|(?P<magnitude>lora_magnitude_vector))$"
)
_HEAD_KEY_RE = re.compile(
    r"^base_model\.model\.lm_head\."
    r"(?:lora_(?P<part>A|B)\.weight|(?P<base>base_layer\.weight)|(?P<magnitude>lora_magnitude_vector))$"
)
# DoRA cannot be combined with these: the engine applies DoRA's column norm to linear projections only.
_DORA_UNSUPPORTED_MODULES = ("embed_tokens", "lm_head")

# Config keys naming PEFT features whose tensors or math this runtime does not implement: must be falsy.
_UNSUPPORTED_FEATURES = (
    "use_qalora",
    "use_bdlora",
    "lora_bias",
    "fan_in_fan_out",
    "layer_replication",
    "trainable_token_indices",
    "target_parameters",
    "alora_invocation_tokens",
    "arrow_config",
    "modules_to_save",
)


@dataclass(frozen=True)
class LoraKey:
    """Where one tensor belongs. ``layer`` is None for embed_tokens / lm_head."""

    layer: int | None
    module: str
    part: LoraPart


def module_path(module: str, layer: int | None) -> str:
    """The module's full name inside the causal LM, as PEFT matches patterns against it."""
    if module == "embed_tokens":
        return "model.embed_tokens"
    if module == "lm_head":
        return "lm_head"
    if layer is None:
        raise ValueError(f"module {module!r} needs a layer index")
    group = "self_attn" if module in ATTENTION_MODULES else "mlp"
    return f"model.layers.{layer}.{group}.{module}"


def lora_key(module: str, layer: int | None, part: LoraPart) -> str:
    """The safetensors key PEFT's ``save_pretrained`` writes; the inverse of ``parse_lora_key``."""
    path = _PREFIX + module_path(module, layer)
    if part == "base_layer":
        return f"{path}.base_layer.weight"
    if part == "magnitude":
        return f"{path}.{MAGNITUDE_SUFFIX}"
    if module == "embed_tokens":
        return f"{path}.lora_embedding_{part[-1]}"
    return f"{path}.lora_{part[-1]}.weight"


def parse_lora_key(key: str) -> LoraKey:
    """Map a PEFT tensor key to (layer, module, part).

    ``InvalidAdapter`` for keys outside the LoRA grammar; ``AdapterIncompatible`` for a well-formed
    LoRA key on a module this runtime does not serve (e.g. a layer norm).
    """
    m = _LAYER_KEY_RE.fullmatch(key)
    if m:
        path, part = m["path"], m["part"]
        group, _, module = path.rpartition(".")
        if (group == "self_attn" and module in ATTENTION_MODULES) or (group == "mlp" and module in MLP_MODULES):
            return LoraKey(int(m["layer"]), module, "magnitude" if m["magnitude"] else "A" if part == "A" else "B")
        raise AdapterIncompatible(
            f"tensor {key!r} adapts module {path!r}, which is not supported; supported: {', '.join(ALL_MODULES)}",
        )
    m = _EMBED_KEY_RE.fullmatch(key)
    if m:
        embed_part: LoraPart = "embedding_A" if m["part"] == "A" else "embedding_B"
        return LoraKey(None, "embed_tokens", _special_part(m, embed_part))
    m = _HEAD_KEY_RE.fullmatch(key)
    if m:
        return LoraKey(None, "lm_head", _special_part(m, "A" if m["part"] == "A" else "B"))
    raise InvalidAdapter(
        f"tensor {key!r} is not a PEFT LoRA key (expected base_model.model.<module>.lora_A.weight ...)"
    )


def _special_part(m: re.Match[str], lora_part: LoraPart) -> LoraPart:
    if m["base"]:
        return "base_layer"
    return "magnitude" if m["magnitude"] else lora_part


def _compile(pattern: str, what: str) -> re.Pattern[str]:
    if not isinstance(pattern, str) or not pattern or len(pattern) > _MAX_PATTERN_LEN:
        raise InvalidAdapter(f"{what} {pattern!r} must be a non-empty string of at most {_MAX_PATTERN_LEN} chars")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise InvalidAdapter(f"{what} {pattern!r} is not a valid regular expression: {exc}") from None


def _pattern_key(patterns: Mapping[str, Any], full_name: str) -> str | None:
    """PEFT's ``get_pattern_key``: first key whose regex matches a dotted suffix of the full name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", full_name):
            return key
    return None


@dataclass(frozen=True)
class LoraConfigInfo:
    """The LoRA-relevant part of ``adapter_config.json``, validated. ``raw`` keeps the parsed JSON as sent."""

    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    target_modules: tuple[str, ...] | str
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    use_dora: bool = False  # DoRA: a lora_magnitude_vector per adapted module (the engine reads it from here)
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def rank_for(self, module: str, layer: int | None) -> int:
        key = _pattern_key(self.rank_pattern, module_path(module, layer))
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module: str, layer: int | None) -> float:
        key = _pattern_key(self.alpha_pattern, module_path(module, layer))
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def scale_for(self, module: str, layer: int | None) -> float:
        """PEFT's ``scaling``: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        rank = self.rank_for(module, layer)
        alpha = self.alpha_for(module, layer)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def targets(self, module: str, layer: int | None) -> bool:
        """Whether PEFT would wrap this module of the base model with LoRA."""
        path = module_path(module, layer)
        if self.exclude_modules:
            if isinstance(self.exclude_modules, str):
                if re.fullmatch(self.exclude_modules, path):
                    return False
            elif any(path == e or path.endswith("." + e) for e in self.exclude_modules):
                return False
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, path) is not None
        if path in self.target_modules:
            return True
        if not any(path.endswith("." + t) for t in self.target_modules):
            return False
        if self.layers_to_transform is None:
            return True
        if not self.layers_pattern:
            m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
        else:
            m = None
            for pattern in self.layers_pattern:
                m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
                if m:
                    break
        return m is not None and int(m["idx"]) in self.layers_to_transform


def _json_number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidAdapter(f"adapter_config {what} must be a finite number, got {value!r}")
    return float(value)


def _positive_rank(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidAdapter(f"adapter_config {what} must be a positive integer, got {value!r}")
    return value


def _str_list(value: Any, what: str) -> tuple[str, ...] | str | None:
    if value is None:
        return None
    if isinstance(value, str):
        _compile(value, what)
        return value
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    raise InvalidAdapter(f"adapter_config {what} must be a string or a list of non-empty strings, got {value!r}")


def parse_adapter_config(json_text: str | bytes) -> LoraConfigInfo:
    """Parse and validate ``adapter_config.json``; anything unsupported is an ``InvalidAdapter`` naming it."""
    try:
        raw = json.loads(json_text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidAdapter(f"adapter_config.json is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise InvalidAdapter("adapter_config.json must be a JSON object")
    if raw.get("peft_type") != "LORA":
        raise InvalidAdapter(
            f"adapter_config peft_type must be 'LORA', got {raw.get('peft_type')!r}",
        )
    for feature in _UNSUPPORTED_FEATURES:
        if raw.get(feature):
            raise InvalidAdapter(f"adapter_config {feature}={raw[feature]!r} is not supported")
    if raw.get("bias", "none") != "none":
        raise InvalidAdapter(
            f"adapter_config bias={raw.get('bias')!r} is not supported (only 'none')",
        )
    r = _positive_rank(raw.get("r"), "r")
    alpha = _json_number(raw.get("lora_alpha", 8), "lora_alpha")
    use_rslora = raw.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise InvalidAdapter(f"adapter_config use_rslora must be a boolean, got {use_rslora!r}")
    use_dora = raw.get("use_dora") or False
    if not isinstance(use_dora, bool):
        raise InvalidAdapter(f"adapter_config use_dora must be a boolean, got {use_dora!r}")
    rank_pattern_raw = raw.get("rank_pattern") or {}
    alpha_pattern_raw = raw.get("alpha_pattern") or {}
    if not isinstance(rank_pattern_raw, dict) or not isinstance(alpha_pattern_raw, dict):
        raise InvalidAdapter("adapter_config rank_pattern and alpha_pattern must be JSON objects")
    rank_pattern = {
        _compile(k, "rank_pattern key").pattern: _positive_rank(v, f"rank_pattern[{k!r}]")
        for k, v in rank_pattern_raw.items()
    }
    alpha_pattern = {
        _compile(k, "alpha_pattern key").pattern: _json_number(v, f"alpha_pattern[{k!r}]")
        for k, v in alpha_pattern_raw.items()
    }
    targets = _str_list(raw.get("target_modules"), "target_modules")
    if not targets:
        raise InvalidAdapter("adapter_config target_modules must name at least one module")
    if targets == ALL_LINEAR_SHORTHAND:
        targets = LINEAR_MODULES
    layers = raw.get("layers_to_transform")
    layers_t: tuple[int, ...] | None
    if layers is None or layers == []:
        layers_t = None
    elif isinstance(layers, int) and not isinstance(layers, bool) and layers >= 0:
        layers_t = (layers,)
    elif isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
        layers_t = tuple(layers)
    else:
        raise InvalidAdapter(f"adapter_config layers_to_transform must be an int or list of ints, got {layers!r}")
    layers_pattern = _str_list(raw.get("layers_pattern"), "layers_pattern")
    if isinstance(layers_pattern, str):
        layers_pattern = (layers_pattern,)
    return LoraConfigInfo(
        r=r,
        lora_alpha=alpha,
        use_rslora=use_rslora,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        target_modules=targets,
        layers_to_transform=layers_t,
        layers_pattern=layers_pattern or None,
        exclude_modules=_str_list(raw.get("exclude_modules"), "exclude_modules"),
        use_dora=use_dora,
        raw=raw,
    )


def _all_slots(spec: ModelSpec) -> list[tuple[str, int | None]]:
    slots: list[tuple[str, int | None]] = [("embed_tokens", None)]
    slots += [(m, i) for i in range(spec.num_hidden_layers) for m in LINEAR_MODULES]
    slots.append(("lm_head", None))
    return slots


def resolve_targets(config: LoraConfigInfo, spec: ModelSpec, max_rank: int) -> dict[tuple[str, int | None], int]:
    """Every (module, layer) of ``spec`` the config adapts, with its rank: all that is knowable pre-upload.

    Raises ``AdapterIncompatible`` when a listed target matches no supported module of this model, nothing is
    targeted, or a rank exceeds ``max_rank``; ``InvalidAdapter`` when a module's scale is non-finite or beyond
    ``MAX_LORA_SCALE`` (reason ``LORA_SCALE_OUT_OF_RANGE``) or DoRA targets an embedding.
    """
    slots = _all_slots(spec)
    paths = [module_path(m, i) for m, i in slots]
    if isinstance(config.target_modules, tuple):
        for entry in config.target_modules:
            if not any(p == entry or p.endswith("." + entry) for p in paths):
                raise AdapterIncompatible(
                    f"target module {entry!r} is not a supported module of {spec.architecture}; supported: "
                    f"{', '.join(ALL_MODULES)}",
                )
    out: dict[tuple[str, int | None], int] = {}
    for module, layer in slots:
        if config.targets(module, layer):
            rank = config.rank_for(module, layer)
            if rank > max_rank:
                raise AdapterIncompatible(
                    f"rank {rank} of {module_path(module, layer)} exceeds the maximum rank {max_rank}",
                )
            _check_scale(config, module, layer)
            if config.use_dora and module in _DORA_UNSUPPORTED_MODULES:
                raise InvalidAdapter(
                    f"DoRA (use_dora=true) on {module} is not supported: DoRA is served on the linear modules of the "
                    f"decoder layers only ({', '.join(LINEAR_MODULES)}); train without {module} in target_modules "
                    "or without use_dora"
                )
            out[(module, layer)] = rank
    if not out:
        raise AdapterIncompatible(
            f"target_modules {config.target_modules!r} match no supported module of {spec.architecture}",
        )
    return out


def _check_scale(config: LoraConfigInfo, module: str, layer: int | None) -> None:
    """The effective scale PEFT would use for this module must be finite and at most ``MAX_LORA_SCALE``."""
    try:
        scale = config.scale_for(module, layer)
    except (OverflowError, ZeroDivisionError):
        scale = math.inf
    if not math.isfinite(scale) or abs(scale) > MAX_LORA_SCALE:
        rank, alpha = config.rank_for(module, layer), config.alpha_for(module, layer)
        rs = config.use_rslora
        formula = f"alpha / sqrt(r) = {alpha!r} / sqrt({rank})" if rs else f"alpha / r = {alpha!r} / {rank}"
        raise InvalidAdapter(
            f"LoRA scale of {module_path(module, layer)} is {formula} = {scale!r}; it must be finite with a magnitude "
            f"of at most {MAX_LORA_SCALE:g} (check lora_alpha, alpha_pattern, rank_pattern and use_rslora)",
            reason="LORA_SCALE_OUT_OF_RANGE",
        )


@dataclass(frozen=True)
class AdapterSummary:
    """What the registry records about a validated adapter; ``module_ranks`` is the max rank per module."""

    rank: int
    module_ranks: dict[str, int]
    lora_alpha: float
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    target_modules: tuple[str, ...]
    dtype: str
    num_params: int
    num_tensors: int
    use_dora: bool = False


def _expected_shape(part: LoraPart, rank: int, in_features: int, out_features: int) -> tuple[int, int]:
    if part in ("A", "embedding_A"):
        return (rank, in_features)
    return (out_features, rank)


def _check_tensor(
    name: str, key: LoraKey, info: TensorInfo, spec: ModelSpec, targets: Mapping[tuple[str, int | None], int]
) -> None:
    if key.layer is not None and key.layer >= spec.num_hidden_layers:
        raise AdapterIncompatible(
            f"tensor {name!r} is for layer {key.layer} but the base model has {spec.num_hidden_layers} layers"
        )
    in_f, out_f = spec.module_shapes()[key.module]
    if key.part == "magnitude":
        _check_magnitude(name, key, info, out_f, targets)
        return
    if key.part == "base_layer":
        want = (spec.vocab_size, spec.hidden_size)
        if info.shape != want:
            raise AdapterIncompatible(f"tensor {name!r} has shape {list(info.shape)}, expected {list(want)}")
        return
    slot = (key.module, key.layer)
    if slot not in targets:
        raise InvalidAdapter(f"tensor {name!r} adapts {module_path(*slot)}, which adapter_config does not target")
    if len(info.shape) != 2:
        raise InvalidAdapter(f"tensor {name!r} has shape {list(info.shape)}, expected 2 dimensions")
    rank = targets[slot]
    want = _expected_shape(key.part, rank, in_f, out_f)
    feature_dim = 1 if key.part in ("A", "embedding_A") else 0
    if info.shape[feature_dim] != want[feature_dim]:
        raise AdapterIncompatible(
            f"tensor {name!r} has shape {list(info.shape)}, expected {list(want)} for this base model"
        )
    if info.shape != want:
        raise InvalidAdapter(
            f"tensor {name!r} has shape {list(info.shape)}, expected {list(want)} (rank {rank} from adapter_config)"
        )


def _check_magnitude(
    name: str, key: LoraKey, info: TensorInfo, out_features: int, targets: Mapping[tuple[str, int | None], int]
) -> None:
    """DoRA's magnitude: one entry per output feature of the adapted module (PEFT's ``[out_features]``)."""
    slot = (key.module, key.layer)
    if slot not in targets:
        raise InvalidAdapter(f"tensor {name!r} adapts {module_path(*slot)}, which adapter_config does not target")
    if len(info.shape) != 1:
        raise InvalidAdapter(f"tensor {name!r} has shape {list(info.shape)}, expected 1 dimension [{out_features}]")
    if info.shape[0] != out_features:
        raise AdapterIncompatible(
            f"tensor {name!r} has shape {list(info.shape)}, expected [{out_features}] for this base model"
        )


def validate_adapter(
    config: LoraConfigInfo,
    tensors: Mapping[str, TensorInfo],
    spec: ModelSpec,
    max_rank: int,
    *,
    allow_dora: bool = False,
) -> AdapterSummary:
    """Check a parsed config + safetensors header against a base model; return what the registry records.

    ``allow_dora``: whether the caller can use DoRA adapters. The registry stores them (``True``); a loader that
    has no DoRA math must keep the default, so a DoRA adapter is refused as incompatible rather than served as
    if it were plain LoRA (its magnitudes silently ignored).
    """
    if config.use_dora and not allow_dora:
        raise AdapterIncompatible("this engine does not serve DoRA adapters (adapter_config use_dora=true)")
    targets = resolve_targets(config, spec, max_rank)
    if not tensors:
        raise InvalidAdapter("adapter weights contain no tensors")
    dtypes: set[str] = set()
    seen: set[tuple[str, int | None, LoraPart]] = set()
    num_params = 0
    for name, info in sorted(tensors.items()):
        key = parse_lora_key(name)
        if info.dtype not in ALLOWED_DTYPES:
            raise InvalidAdapter(f"tensor {name!r} has dtype {info.dtype}, expected one of {', '.join(ALLOWED_DTYPES)}")
        dtypes.add(info.dtype)
        if len(dtypes) > 1:
            raise InvalidAdapter(
                f"tensor {name!r} has dtype {info.dtype} but others are {sorted(dtypes - {info.dtype})}"
            )
        if key.part == "base_layer" and (key.module, None) not in targets:
            raise InvalidAdapter(f"tensor {name!r} copies a base layer that adapter_config does not target")
        if key.part == "magnitude" and not config.use_dora:
            raise InvalidAdapter(f"tensor {name!r} is a DoRA magnitude but adapter_config does not set use_dora")
        _check_tensor(name, key, info, spec, targets)
        seen.add((key.module, key.layer, key.part))
        if key.part != "base_layer":
            num_params += info.numel
    for module, layer in targets:
        a: LoraPart = "embedding_A" if module == "embed_tokens" else "A"
        b: LoraPart = "embedding_B" if module == "embed_tokens" else "B"
        has_a, has_b = (module, layer, a) in seen, (module, layer, b) in seen
        if has_a != has_b:
            missing = lora_key(module, layer, b if has_a else a)
            raise InvalidAdapter(f"tensor {missing!r} is missing: every LoRA A needs its B and vice versa")
        if not has_a:
            raise AdapterIncompatible(
                f"adapter_config targets {module_path(module, layer)} of this base model but the weights "
                f"have no "
                f"tensor {lora_key(module, layer, a)!r} (adapter made for a different base model?)"
            )
        if config.use_dora and (module, layer, "magnitude") not in seen:
            raise InvalidAdapter(
                f"tensor {lora_key(module, layer, 'magnitude')!r} is missing: a DoRA adapter (use_dora=true) needs "
                "a magnitude vector for every module it adapts"
            )
    module_ranks: dict[str, int] = {}
    for (module, _), rank in targets.items():
        module_ranks[module] = max(rank, module_ranks.get(module, 0))
    return AdapterSummary(
        rank=max(module_ranks.values()),
        module_ranks=dict(sorted(module_ranks.items())),
        lora_alpha=config.lora_alpha,
        use_rslora=config.use_rslora,
        rank_pattern=dict(config.rank_pattern),
        alpha_pattern=dict(config.alpha_pattern),
        target_modules=tuple(sorted(module_ranks)),
        dtype=dtypes.pop(),
        num_params=num_params,
        num_tensors=len(tensors),
        use_dora=config.use_dora,
    )
