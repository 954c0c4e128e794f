"""Which registered base model this engine serves: the name adapters must have been registered for.

Why the engine must know: adapters are validated against the base model they were registered for, and another
base model of the same shapes (a chat and a base variant, two fine-tunes) would accept them silently and produce
garbage. So with a registry configured the engine always has a name: ``--base-model`` when given (checked against
the registry's record of it), else the one registered base model whose ``config.json`` equals the served one.
None or several matches refuse the start with a clear message naming the candidates.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from loraplex.registry.client import RegistryClient
from loraplex.registry.errors import FailedPrecondition, NotFound, PermissionDenied, Unauthenticated, Unavailable
from loraplex.registry.v1 import registry_service_pb2 as rpb

log = logging.getLogger("loraplex.engine")

# Keys of config.json that differ between copies of the same weights (tooling, storage dtype, quantization).
_VOLATILE_KEYS = frozenset(
    {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "quantization_config", "use_cache"}
)


def comparable_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config.json`` without the keys that do not change what the model computes."""
    return {k: v for k, v in config.items() if k not in _VOLATILE_KEYS}


def matching_models(served: Mapping[str, Any], registered: Sequence[rpb.BaseModel]) -> list[str]:
    """Names of the registered base models whose config equals the served model's (volatile keys aside)."""
    want = comparable_config(served)
    names = []
    for model in registered:
        try:
            config = json.loads(model.config_json)
        except json.JSONDecodeError:
            continue
        if isinstance(config, dict) and comparable_config(config) == want:
            names.append(model.name)
    return sorted(names)


async def determine_base_model(client: RegistryClient, model_dir: Path, configured: str) -> str:
    """The registered base model name this engine serves (see the module docstring); raises on a start error."""
    served = json.loads((model_dir / "config.json").read_text())
    if configured:
        try:
            record = await client.get_base_model(configured)
        except NotFound:
            raise FailedPrecondition(
                f"--base-model {configured!r} is not registered in the registry; register it with "
                f"`loraplex models register {model_dir} --name {configured}`",
                reason="BASE_MODEL_NOT_REGISTERED",
            ) from None
        except (Unavailable, Unauthenticated, PermissionDenied) as exc:
            # No way to check now (registry down, or this engine has no --registry-token of its own): adapters
            # are still matched by this name on every resolve.
            log.warning("cannot check --base-model %s against the registry (%s); trusting it", configured, exc.reason)
            return configured
        if not matching_models(served, [record]):
            raise FailedPrecondition(
                f"--base-model {configured!r} was registered with a different config.json than {model_dir}",
                reason="BASE_MODEL_MISMATCH",
            )
        return configured
    try:
        registered = await client.list_base_models()
    except (Unavailable, Unauthenticated, PermissionDenied) as exc:
        raise FailedPrecondition(
            f"cannot tell which registered base model {model_dir} is: listing base models failed ({exc.reason}); "
            "pass --base-model NAME (or give the engine a --registry-token)",
            reason="BASE_MODEL_UNKNOWN",
        ) from None
    names = matching_models(served, registered)
    if len(names) == 1:
        log.info("serving registered base model %s", names[0])
        return names[0]
    if not names:
        raise FailedPrecondition(
            f"no registered base model has the config.json of {model_dir}; register it with "
            f"`loraplex models register {model_dir} --name NAME` or pass --base-model NAME",
            reason="BASE_MODEL_UNKNOWN",
        )
    raise FailedPrecondition(
        f"several registered base models match {model_dir}: {', '.join(names)}; pass --base-model NAME",
        reason="BASE_MODEL_AMBIGUOUS",
    )
