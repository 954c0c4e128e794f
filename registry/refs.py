"""Names and references: the one place that decides what an adapter, alias or base-model name may look like.

Why strict rules: names become SQL keys, paths in tooling, cache keys in the engine and parts of URLs. A small
lowercase alphabet, bounded lengths and no ``..`` make every one of those uses safe without escaping.
Every failure is an ``InvalidArgument`` carrying the offending text, so callers can show it as-is.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from loraplex.registry.errors import InvalidArgument

ADAPTER_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}/[a-z0-9][a-z0-9._-]{0,62}$")
ALIAS_RE = re.compile(r"^[a-z][a-z0-9._-]{0,62}$")
BASE_MODEL_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
LABEL_KEY_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,62}$")
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
SHA256_HEX_RE = re.compile(r"^[0-9a-f]{64}$")
VERSION_RE = re.compile(r"^[1-9][0-9]{0,9}$")

LATEST = "latest"
MAX_VERSION = 2**31 - 1
MAX_LABEL_VALUE_LEN = 63
MAX_LABELS = 64
MAX_REF_LEN = 256

SelectorKind = Literal["latest", "version", "alias", "digest"]


@dataclass(frozen=True)
class AdapterRef:
    """A parsed reference: ``name`` is the full ``ns/name``; ``value`` the selector text ("" = latest)."""

    name: str
    namespace: str
    selector_kind: SelectorKind
    value: str

    @property
    def version(self) -> int:
        """The version number of a ``version`` selector (``InvalidArgument`` for any other kind)."""
        if self.selector_kind != "version":
            raise InvalidArgument(f"reference {self} does not select a version number")
        return int(self.value)

    def __str__(self) -> str:
        if self.selector_kind == "latest":
            return self.name
        return f"{self.name}@{self.value}"


def _shown(text: str) -> str:
    """Quote user text for an error message without letting a huge input flood logs."""
    return repr(text if len(text) <= 80 else text[:77] + "...")


def validate_adapter_name(name: str) -> str:
    """Check ``namespace/name`` and return it unchanged."""
    if not isinstance(name, str) or not ADAPTER_NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidArgument(
            f"invalid adapter name {_shown(str(name))}: expected 'namespace/name', each part 1-63 chars of "
            "[a-z0-9._-] starting with a letter or digit, no '..'",
            reason="INVALID_NAME",
        )
    return name


def namespace_of(name: str) -> str:
    """The namespace part of a validated adapter name."""
    return validate_adapter_name(name).split("/", 1)[0]


def validate_namespace(namespace: str) -> str:
    """A namespace alone (as used for tenancy filters) follows the first half of the adapter-name rule."""
    if (
        not isinstance(namespace, str)
        or not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,62}", namespace)
        or (".." in namespace)
    ):
        raise InvalidArgument(f"invalid namespace {_shown(str(namespace))}", reason="INVALID_NAME")
    return namespace


def validate_alias(alias: str) -> str:
    """A settable alias: lowercase, starts with a letter; ``latest`` is implicit and can never be set."""
    if not isinstance(alias, str) or not ALIAS_RE.fullmatch(alias) or ".." in alias:
        raise InvalidArgument(
            f"invalid alias {_shown(str(alias))}: expected 1-63 chars of [a-z0-9._-] starting with a letter",
            reason="INVALID_ALIAS",
        )
    if alias == LATEST:
        raise InvalidArgument(
            "alias 'latest' is reserved: it always means the newest ready version", reason="RESERVED_ALIAS"
        )
    return alias


def validate_base_model_name(name: str) -> str:
    """Base model names are flat (no namespace): 1-128 chars of [a-z0-9._-]."""
    if not isinstance(name, str) or not BASE_MODEL_NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidArgument(
            f"invalid base model name {_shown(str(name))}: expected 1-128 chars of [a-z0-9._-] starting "
            "with a letter or digit, no '..'",
            reason="INVALID_NAME",
        )
    return name


def validate_version_number(version: int) -> int:
    """Versions are positive 31-bit integers (they travel as int32/int64 in protos and SQL)."""
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        raise InvalidArgument(
            f"invalid version {version!r}: expected an integer in 1..{MAX_VERSION}", reason="INVALID_VERSION"
        )
    return version


def validate_sha256_hex(value: str, what: str = "sha256") -> str:
    """64 lowercase hex characters."""
    if not isinstance(value, str) or not SHA256_HEX_RE.fullmatch(value):
        raise InvalidArgument(
            f"invalid {what} {_shown(str(value))}: expected 64 lowercase hex characters",
            reason="INVALID_SHA256",
        )
    return value


def validate_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """Label keys like aliases (dots allowed), values up to 63 printable chars; at most 64 labels."""
    if not isinstance(labels, Mapping):
        raise InvalidArgument("labels must be a mapping of str to str", reason="INVALID_LABEL")
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"too many labels ({len(labels)} > {MAX_LABELS})", reason="INVALID_LABEL")
    out: dict[str, str] = {}
    for key, value in labels.items():
        if not isinstance(key, str) or not LABEL_KEY_RE.fullmatch(key):
            raise InvalidArgument(
                f"invalid label key {_shown(str(key))}: expected 1-63 chars of [a-z0-9_.-] starting with a letter",
                reason="INVALID_LABEL",
            )
        if not isinstance(value, str) or len(value) > MAX_LABEL_VALUE_LEN or not value.isprintable():
            raise InvalidArgument(
                f"invalid value for label {key!r}: expected a printable string of at most {MAX_LABEL_VALUE_LEN} chars",
                reason="INVALID_LABEL",
            )
        out[key] = value
    return out


def parse_ref(ref: str) -> AdapterRef:
    """Parse ``ns/name``, ``ns/name@3``, ``ns/name@prod``, ``ns/name@latest`` or ``ns/name@sha256:<hex>``."""
    if not isinstance(ref, str) or not ref or len(ref) > MAX_REF_LEN:
        raise InvalidArgument(f"invalid adapter reference {_shown(str(ref))}", reason="INVALID_REF")
    name, sep, selector = ref.partition("@")
    validate_adapter_name(name)
    namespace = name.split("/", 1)[0]
    if not sep or selector == LATEST:
        return AdapterRef(name, namespace, "latest", "")
    if selector.startswith("sha256:"):
        if not DIGEST_RE.fullmatch(selector):
            raise InvalidArgument(
                f"invalid digest selector in {_shown(ref)}: expected sha256:<64 lowercase hex>",
                reason="INVALID_REF",
            )
        return AdapterRef(name, namespace, "digest", selector)
    if selector[:1].isdigit():
        if not VERSION_RE.fullmatch(selector) or int(selector) > MAX_VERSION:
            raise InvalidArgument(
                f"invalid version selector in {_shown(ref)}: expected a positive integer, no leading zeros",
                reason="INVALID_REF",
            )
        return AdapterRef(name, namespace, "version", selector)
    if not ALIAS_RE.fullmatch(selector) or ".." in selector:
        raise InvalidArgument(
            f"invalid selector in {_shown(ref)}: expected a version number, an alias, 'latest' or sha256:<hex>",
            reason="INVALID_REF",
        )
    return AdapterRef(name, namespace, "alias", selector)
