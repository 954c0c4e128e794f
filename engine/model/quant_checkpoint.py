"""Checkpoints saved quantized by transformers + bitsandbytes: recognise them, read them, reject the rest.

A model saved with ``BitsAndBytesConfig`` has ``quantization_config`` in config.json and, per quantized linear:
  * NF4: ``<m>.weight`` (packed uint8, two 4-bit codes per byte), ``.weight.absmax``, ``.weight.quant_map`` and
    ``.weight.quant_state.bitsandbytes__nf4`` (JSON as uint8: quant_type, blocksize, dtype, shape, and with
    double quantization nested_blocksize / nested_offset plus the ``.weight.nested_absmax`` /
    ``.weight.nested_quant_map`` tensors);
  * int8: ``<m>.weight`` (int8 [N, K]), ``<m>.SCB`` (fp32 [N]) and ``<m>.weight_format`` (0 = row-major).
Modules the checkpoint skipped (``llm_int8_skip_modules``, lm_head by default) are ordinary tensors. Every size
is checked against the shapes config.json implies, so a damaged checkpoint fails at load naming the tensor.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import torch

from loraplex.engine.model.errors import ModelLoadError
from loraplex.engine.model.quant_int8 import Int8Tensors
from loraplex.engine.model.quant_nf4 import ALLOWED_BLOCKSIZES, NF4Tensors

METHODS = ("none", "nf4", "int8")
_STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def checkpoint_quantization(cfg: dict[str, Any]) -> str:
    """"none", "nf4" or "int8" from config.json's ``quantization_config``; anything else is a ModelLoadError."""
    qc = cfg.get("quantization_config")
    if qc is None:
        return "none"
    if not isinstance(qc, dict):
        raise ModelLoadError("config.json: 'quantization_config' must be an object")
    method = qc.get("quant_method")
    if method != "bitsandbytes":
        raise ModelLoadError(
            f"config.json: quantization method {method!r} is not supported "
            "(supported: 'bitsandbytes' NF4 or int8; or an unquantized checkpoint with --quantization)"
        )
    if qc.get("load_in_4bit"):
        quant_type = qc.get("bnb_4bit_quant_type", "fp4")
        if quant_type != "nf4":
            raise ModelLoadError(
                f"config.json: bitsandbytes 4-bit quant type {quant_type!r} is not supported (only 'nf4')"
            )
        return "nf4"
    if qc.get("load_in_8bit"):
        return "int8"
    raise ModelLoadError("config.json: bitsandbytes quantization_config sets neither load_in_4bit nor load_in_8bit")


Getter = Callable[[str], torch.Tensor]


def is_quantized(method: str, name: str, has: Callable[[str], bool]) -> bool:
    """Whether the checkpoint stores projection ``name`` (``<m>.weight``) quantized (skipped modules are not)."""
    if method == "nf4":
        if has(name + ".quant_state.bitsandbytes__fp4"):
            raise ModelLoadError(f"tensor {name}: bitsandbytes fp4 is not supported (only nf4)")
        return has(name + ".quant_state.bitsandbytes__nf4")
    if method == "int8":
        return has(name.removesuffix(".weight") + ".SCB")
    return False


def _check_numel(name: str, t: torch.Tensor, want: int) -> None:
    if t.numel() != want:
        raise ModelLoadError(f"tensor {name} has {t.numel()} elements, expected {want}")


def _check_dtype(name: str, t: torch.Tensor, want: torch.dtype) -> None:
    if t.dtype != want:
        raise ModelLoadError(f"tensor {name} has dtype {t.dtype}, expected {want}")


def _nf4_state(name: str, raw: torch.Tensor) -> dict[str, Any]:
    key = name + ".quant_state.bitsandbytes__nf4"
    try:
        state = json.loads(bytes(raw.reshape(-1).to(torch.uint8).tolist()).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"tensor {key}: not a bitsandbytes quant state ({exc})") from exc
    if not isinstance(state, dict):
        raise ModelLoadError(f"tensor {key}: not a bitsandbytes quant state")
    return state


def read_nf4(get: Getter, name: str, shape: tuple[int, int]) -> NF4Tensors:
    """The NF4 tensors of projection ``name`` (``<m>.weight``), validated against its [N, K] ``shape``."""
    key = name + ".quant_state.bitsandbytes__nf4"
    state = _nf4_state(name, get(key))
    if state.get("quant_type") != "nf4":
        raise ModelLoadError(f"tensor {key}: quant_type {state.get('quant_type')!r} is not supported (only nf4)")
    blocksize = state.get("blocksize")
    if blocksize not in ALLOWED_BLOCKSIZES:
        raise ModelLoadError(f"tensor {key}: blocksize {blocksize!r} not one of {ALLOWED_BLOCKSIZES}")
    if list(state.get("shape") or []) != list(shape):
        raise ModelLoadError(f"tensor {key}: shape {state.get('shape')!r}, expected {list(shape)}")
    dtype = _STATE_DTYPES.get(str(state.get("dtype")))
    if dtype is None:
        raise ModelLoadError(f"tensor {key}: dtype {state.get('dtype')!r} not one of {sorted(_STATE_DTYPES)}")
    n = shape[0] * shape[1]
    if shape[1] % 2:
        raise ModelLoadError(f"tensor {name}: NF4 needs an even number of input features, got {shape[1]}")
    packed = get(name).contiguous().reshape(-1).view(torch.uint8)  # any quant_storage dtype holds the same bytes
    _check_numel(name, packed, math.ceil(n / 2))
    blocks = math.ceil(n / int(blocksize))
    code = get(name + ".quant_map")
    _check_numel(name + ".quant_map", code, 16)
    absmax = get(name + ".absmax").reshape(-1)
    _check_numel(name + ".absmax", absmax, blocks)
    if "nested_blocksize" not in state:
        return NF4Tensors(packed, absmax.float(), code.float(), shape, dtype, int(blocksize))
    nested_blocksize = state["nested_blocksize"]
    offset = state.get("nested_offset")
    if not isinstance(nested_blocksize, int) or nested_blocksize <= 0 or not isinstance(offset, (int, float)):
        raise ModelLoadError(f"tensor {key}: malformed nested_blocksize / nested_offset")
    _check_dtype(name + ".absmax", absmax, torch.uint8)
    absmax2 = get(name + ".nested_absmax").reshape(-1).float()
    _check_numel(name + ".nested_absmax", absmax2, math.ceil(blocks / nested_blocksize))
    code2 = get(name + ".nested_quant_map").reshape(-1).float()
    _check_numel(name + ".nested_quant_map", code2, 256)
    return NF4Tensors(
        packed=packed,
        absmax=absmax,
        code=code.float(),
        shape=shape,
        dtype=dtype,
        blocksize=int(blocksize),
        absmax2=absmax2,
        offset=torch.tensor(float(offset), dtype=torch.float32),
        code2=code2,
        nested_blocksize=nested_blocksize,
    )


def read_int8(get: Getter, has: Callable[[str], bool], name: str, shape: tuple[int, int]) -> Int8Tensors:
    """The int8 tensors of projection ``name`` (``<m>.weight``), validated against its [N, K] ``shape``."""
    module = name.removesuffix(".weight")
    cb = get(name)
    _check_dtype(name, cb, torch.int8)
    if tuple(cb.shape) != shape:
        raise ModelLoadError(f"tensor {name} has shape {list(cb.shape)}, expected {list(shape)}")
    scb = get(module + ".SCB").reshape(-1)
    _check_numel(module + ".SCB", scb, shape[0])
    if has(module + ".weight_format"):
        fmt = get(module + ".weight_format")
        if fmt.numel() != 1 or int(fmt.reshape(-1)[0]) != 0:
            raise ModelLoadError(f"tensor {module}.weight_format: only the row-major int8 format (0) is supported")
    return Int8Tensors(cb=cb.contiguous(), scb=scb.float())
