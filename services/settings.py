"""Settings: one typed object per command, filled from CLI flags over ``LORAPLEX_*`` env vars over defaults.

Why generated flags: each field is declared once (name, type, default, help) and becomes both the
``--flag-name`` and the ``LORAPLEX_FLAG_NAME`` variable, so the README's config table, the CLI and the env can
never disagree. ``settings_table()`` renders that table for docs.

Parsing rules, one place for every service: fields named ``*_bytes`` take sizes with units (``4GiB``, ``512MiB``,
``1.5GB``, ``4096``); numbers are range-checked (a count is at least 1, a duration at least 0, a port within
0..65535) so ``--max-rank -5`` is one clear error at start, not a failure deep inside a running server. Errors
name the flag or variable as the user typed it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import types
from dataclasses import dataclass, field
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from loraplex.registry.errors import InvalidArgument

T = TypeVar("T")
GiB = 1024**3
MiB = 1024**2


def opt(default: Any, help: str, env: str | None = None) -> Any:
    return field(default=default, metadata={"help": help, "env": env})


@dataclass(frozen=True)
class ClientSettings:
    """How CLI client commands reach the services."""

    registry: str = opt("127.0.0.1:50052", "registry address HOST:PORT", env="LORAPLEX_REGISTRY")
    token: str | None = opt(None, "bearer token sent as 'authorization' metadata", env="LORAPLEX_TOKEN")
    timeout: float = opt(60.0, "per-call deadline in seconds (uploads/downloads scale it by size)")


@dataclass(frozen=True)
class RegistrySettings:
    """The registry server."""

    listen: str = opt("127.0.0.1:50052", "address to listen on")
    db: str = opt(
        "sqlite:///./.loraplex/registry.db", "SQLAlchemy database URL (sqlite:///… or postgresql+psycopg://…)"
    )
    blobs: str = opt("file://./.loraplex/blobs", "blob store: file:///dir, file://./rel or s3://bucket/prefix")
    s3_endpoint: str | None = opt(None, "S3 endpoint URL (MinIO etc.); AWS credentials come from the usual env vars")
    tokens_file: str | None = opt(None, "JSON file of bearer tokens → namespaces/scopes; unset = auth off")
    insecure: bool = opt(False, "allow listening beyond loopback without tokens")
    max_rank: int = opt(256, "largest LoRA rank accepted")
    max_adapter_bytes: int = opt(4 * GiB, "largest adapter_model.safetensors accepted")
    spool_dir: str | None = opt(None, "where uploads are staged before validation (default: $TMPDIR/loraplex-spool)")
    gc_grace_seconds: float = opt(3600.0, "orphan blobs younger than this are kept by gc")
    drain_seconds: float = opt(30.0, "on SIGTERM: stop admitting, let in-flight calls finish this long, then end them")
    log_level: str = opt("info", "log level")


@dataclass(frozen=True)
class EngineSettings:
    """The engine server."""

    model: str = opt("", "Hugging Face model folder (config.json, *.safetensors, tokenizer.json)")
    base_model: str = opt("", "the model's registry name; adapters for another base model are refused")
    registry: str = opt(
        "", "registry HOST:PORT to pull adapters from (empty: base model only)", env="LORAPLEX_REGISTRY"
    )
    registry_token: str | None = opt(None, "token for registry calls when the caller sends none")
    listen: str = opt("127.0.0.1:50051", "address to listen on")
    http_listen: str = opt(
        "127.0.0.1:8000", "OpenAI-compatible HTTP API address HOST:PORT, same engine and loop (empty: disabled)"
    )
    tokens_file: str | None = opt(None, "JSON file of bearer tokens (admin RPCs need the admin scope)")
    insecure: bool = opt(False, "allow listening beyond loopback without tokens")
    device: str = opt("cpu", "cpu or cuda")
    dtype: str = opt("auto", "auto, float32, bfloat16 or float16")
    quantization: str = opt("none", "base linear weights: none, nf4 or int8 (a quantized checkpoint loads as saved)")
    lora_backend: str = opt("auto", "LoRA kernels: auto (Triton on CUDA, torch elsewhere), torch or triton")
    enforce_eager: bool = opt(False, "never capture CUDA graphs for decode steps")
    merge_adapter: str = opt("", "registry reference of an adapter to fold into the base weights at start")
    max_num_seqs: int = opt(64, "sequences per batch")
    max_num_batched_tokens: int = opt(1024, "tokens per step (prefill chunks + decodes)")
    max_adapters_per_batch: int = opt(
        256, "distinct adapters per step (device pool slots; the pool's bytes usually bind first)"
    )
    max_lora_rank: int = opt(64, "largest adapter rank this engine serves")
    max_dora_adapters: int = opt(8, "DoRA adapters the device pool holds at once (0: refuse DoRA adapters)")
    kv_cache_bytes: int | None = opt(None, "KV-cache budget in bytes (default: max_num_seqs x 2048 tokens)")
    block_size: int = opt(16, "tokens per KV block")
    gpu_adapter_bytes: int | None = opt(None, "device adapter pool budget (default: every slot at max rank)")
    host_adapter_bytes: int = opt(2 * GiB, "host adapter cache budget")
    disk_cache_dir: str | None = opt(None, "tier 3: keep downloaded adapters here by digest (unset: no disk tier)")
    disk_cache_bytes: int = opt(20 * GiB, "disk tier budget (LRU)")
    alias_ttl_seconds: float = opt(5.0, "how long a resolved alias or 'latest' is trusted")
    max_queue: int = opt(1024, "requests in flight before RESOURCE_EXHAUSTED")
    tenant_weights: str = opt("", "fair-share weights per tenant, e.g. 'acme=2,beta=1' (unlisted tenants: 1)")
    max_wait_seconds: float = opt(
        10.0, "a request waiting longer than this counts as top priority and is not passed over for adapter affinity"
    )
    drain_seconds: float = opt(30.0, "on SIGTERM: stop admitting, let running requests finish this long, then end them")
    max_model_len: int | None = opt(None, "context length cap (default: the model's)")
    metrics_port: int | None = opt(None, "serve Prometheus metrics on this port (0 = a free one)")
    metrics_host: str = opt("127.0.0.1", "address the metrics endpoint binds (0.0.0.0 inside a container)")
    log_level: str = opt("info", "log level")


def _env_name(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata.get("env") or "LORAPLEX_" + f.name.upper())


def _base_type(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0]
    return tp


SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(?P<number>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>[A-Za-z]*)\s*$")


@dataclass(frozen=True)
class _Range:
    low: float
    high: float = math.inf
    low_inclusive: bool = True

    def holds(self, value: float) -> bool:
        above = value >= self.low if self.low_inclusive else value > self.low
        return above and value <= self.high

    def describe(self) -> str:
        low = f"at least {self.low:g}" if self.low_inclusive else f"more than {self.low:g}"
        return low if self.high == math.inf else f"{low} and at most {self.high:g}"


COUNT = _Range(1)  # every int setting counts something (ranks, sequences, bytes, blocks)
DURATION = _Range(0)  # every float setting is seconds
# The settings whose range differs from their type's rule above.
_RANGES: dict[str, _Range] = {"metrics_port": _Range(0, 65535), "timeout": _Range(0, low_inclusive=False)}


def parse_size(raw: str) -> int:
    """Bytes from ``4096``, ``4GiB``, ``512 MiB`` or ``1.5GB`` (binary KiB..TiB, decimal kB..TB; case-insensitive)."""
    m = _SIZE_RE.fullmatch(raw)
    unit = SIZE_UNITS.get(m["unit"].lower()) if m else None
    if m is None or unit is None:
        raise ValueError(raw)
    number: str = m["number"]
    whole, _, fraction = number.partition(".")
    numerator: int = int(whole + fraction) * unit
    denominator: int = 10 ** len(fraction)
    if numerator % denominator:
        raise ValueError(raw)  # not a whole number of bytes
    return numerator // denominator


def _parse(tp: Any, raw: str, name: str, source: str | None = None) -> Any:
    """``raw`` as the field's type; ``source`` is how the user named it (``--max-rank``, ``LORAPLEX_MAX_RANK``)."""
    base = _base_type(tp)
    where = source or name
    try:
        if base is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        value = parse_size(raw) if base is int and name.endswith("_bytes") else base(raw)
    except ValueError as exc:
        if base is int and name.endswith("_bytes"):
            raise InvalidArgument(
                f"{where}: cannot parse {raw!r} as a size: use bytes or a unit, e.g. 4GiB, 512MiB, 1.5GB",
                reason="INVALID_SETTING",
            ) from exc
        raise InvalidArgument(f"{where}: cannot parse {raw!r} as {base.__name__}", reason="INVALID_SETTING") from exc
    if base in (int, float):
        allowed = _RANGES.get(name, COUNT if base is int else DURATION)
        if not math.isfinite(value) or not allowed.holds(value):
            raise InvalidArgument(f"{where}: must be {allowed.describe()}, got {raw}", reason="INVALID_SETTING")
    return value


def add_arguments(parser: argparse.ArgumentParser, cls: type[Any]) -> None:
    """Add one ``--flag`` per settings field (defaults resolved later, so env vars apply)."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} [env {_env_name(f)}; default {f.default!r}]"
        if _base_type(hints[f.name]) is bool:
            parser.add_argument(flag, dest=f.name, action="store_const", const="true", default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=None, help=help_text)


def from_sources(cls: type[T], args: argparse.Namespace | None = None, env: dict[str, str] | None = None) -> T:
    """Resolve each field: CLI flag, else env var, else the declared default."""
    environ = os.environ if env is None else env
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        raw = getattr(args, f.name, None) if args is not None else None
        source = "--" + f.name.replace("_", "-")
        if raw is None:
            raw, source = environ.get(_env_name(f)), _env_name(f)
        if raw is not None:
            values[f.name] = _parse(hints[f.name], str(raw), f.name, source)
    return cls(**values)


def settings_table(cls: type[Any]) -> str:
    """A Markdown table of flags, env vars, defaults and meanings (for README/docs)."""
    rows = ["| flag | env | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        rows.append(
            f"| `--{f.name.replace('_', '-')}` | `{_env_name(f)}` | `{f.default!r}` | {f.metadata.get('help', '')} |"
        )
    return "\n".join(rows)
