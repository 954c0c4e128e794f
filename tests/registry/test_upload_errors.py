"""Bad uploads on both back ends: each fails with the right error class and reason and changes nothing."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from loraplex.registry.errors import (
    AdapterIncompatible,
    AdapterNotFound,
    InvalidAdapter,
    InvalidArgument,
    LoraplexError,
)
from loraplex.registry.service import RegistryLimits, RegistryService
from tests.fixtures.backends import Backend
from tests.fixtures.hf import model_config, read_adapter
from tests.registry.conftest import build_service
from tests.registry.helpers import build_safetensors, entries_of, read_header, upload, with_header

A0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@dataclass(frozen=True)
class Case:
    """A mutation of a good upload (config text, weights bytes) plus upload options."""

    mutate: Callable[[str, bytes], tuple[str, bytes]]
    error: type[LoraplexError]
    reason: str
    declared_delta: int = 0
    expected_sha256: str | None = None
    adapter: str = "acme/target"


def _config(patch: dict[str, object]) -> Callable[[str, bytes], tuple[str, bytes]]:
    return lambda c, w: (json.dumps({**json.loads(c), **patch}), w)


def _header(edit: Callable[[dict[str, dict[str, object]]], None]) -> Callable[[str, bytes], tuple[str, bytes]]:
    def apply(c: str, w: bytes) -> tuple[str, bytes]:
        header = read_header(w)
        edit(header)
        return c, with_header(w, header)

    return apply


def _entries(edit: Callable[[dict[str, tuple[str, list[int]]]], None]) -> Callable[[str, bytes], tuple[str, bytes]]:
    def apply(c: str, w: bytes) -> tuple[str, bytes]:
        entries = entries_of(w)
        edit(entries)
        return c, build_safetensors(entries)

    return apply


def _rename(old: str, new: str) -> Callable[[dict[str, tuple[str, list[int]]]], None]:
    def edit(entries: dict[str, tuple[str, list[int]]]) -> None:
        entries[new] = entries.pop(old)

    return edit


def _set(name: str, value: tuple[str, list[int]]) -> Callable[[dict[str, tuple[str, list[int]]]], None]:
    return lambda entries: entries.__setitem__(name, value)


def _drop(name: str) -> Callable[[dict[str, tuple[str, list[int]]]], None]:
    return lambda entries: entries.__delitem__(name)


def _relayer(entries: dict[str, tuple[str, list[int]]]) -> None:
    for key in [k for k in entries if ".layers.1." in k]:
        entries[key.replace(".layers.1.", ".layers.5.")] = entries.pop(key)


def _overlap(header: dict[str, dict[str, object]]) -> None:
    header[B0]["data_offsets"] = header[A0]["data_offsets"]
    header[B0]["shape"] = header[A0]["shape"]


def _out_of_range(header: dict[str, dict[str, object]]) -> None:
    begin, end = header[A0]["data_offsets"]  # type: ignore[misc]
    header[A0]["data_offsets"] = [begin + 10**9, end + 10**9]


def _poison(value: float, dtype_format: str = "<f") -> Callable[[str, bytes], tuple[str, bytes]]:
    """Overwrite the 3rd element of B0 with ``value`` (a NaN/Inf the registry must find in the byte stream)."""

    def apply(c: str, w: bytes) -> tuple[str, bytes]:
        (n,) = struct.unpack("<Q", w[:8])
        start = 8 + n + read_header(w)[B0]["data_offsets"][0] + 2 * 4
        return c, w[:start] + struct.pack(dtype_format, value) + w[start + 4 :]

    return apply


def _gap(header: dict[str, dict[str, object]]) -> None:
    """Move every tensor 4 bytes later: the data section now starts with 4 unused bytes (the loader refuses)."""
    for name, entry in header.items():
        if name != "__metadata__":
            begin, end = entry["data_offsets"]  # type: ignore[misc]
            entry["data_offsets"] = [begin + 4, end + 4]


IDENTITY: Callable[[str, bytes], tuple[str, bytes]] = lambda c, w: (c, w)  # noqa: E731

CASES: dict[str, Case] = {
    "truncated": Case(lambda c, w: (c, w[:-100]), InvalidAdapter, "INVALID_ADAPTER"),
    "tiny-file": Case(lambda c, w: (c, w[:6]), InvalidAdapter, "INVALID_ADAPTER"),
    "header-len-past-eof": Case(
        lambda c, w: (c, struct.pack("<Q", len(w) + 1) + w[8:]), InvalidAdapter, "INVALID_ADAPTER"
    ),
    "overlapping-offsets": Case(_header(_overlap), InvalidAdapter, "INVALID_ADAPTER"),
    "offsets-out-of-range": Case(_header(_out_of_range), InvalidAdapter, "INVALID_ADAPTER"),
    "unknown-dtype": Case(_header(lambda h: h[A0].__setitem__("dtype", "Q7")), InvalidAdapter, "INVALID_ADAPTER"),
    "int-dtype": Case(_entries(_set(A0, ("I32", [8, 64]))), InvalidAdapter, "INVALID_ADAPTER"),
    "mixed-dtypes": Case(_entries(_set(A0, ("F16", [8, 64]))), InvalidAdapter, "INVALID_ADAPTER"),
    "non-lora-key": Case(
        _entries(_set("base_model.model.model.layers.0.self_attn.q_proj.weight", ("F32", [64, 64]))),
        InvalidAdapter,
        "INVALID_ADAPTER",
    ),
    "wrong-a-in-features": Case(_entries(_set(A0, ("F32", [8, 32]))), AdapterIncompatible, "ADAPTER_INCOMPATIBLE"),
    "wrong-b-out-features": Case(_entries(_set(B0, ("F32", [48, 8]))), AdapterIncompatible, "ADAPTER_INCOMPATIBLE"),
    "rank-disagrees-with-config": Case(_entries(_set(A0, ("F32", [4, 64]))), InvalidAdapter, "INVALID_ADAPTER"),
    "missing-b": Case(_entries(_drop(B0)), InvalidAdapter, "INVALID_ADAPTER"),
    "layer-out-of-range": Case(_entries(_relayer), AdapterIncompatible, "ADAPTER_INCOMPATIBLE"),
    "unsupported-module-key": Case(
        _entries(_rename(A0, "base_model.model.model.layers.0.input_layernorm.lora_A.weight")),
        AdapterIncompatible,
        "ADAPTER_INCOMPATIBLE",
    ),
    "unsupported-module-config": Case(
        _config({"target_modules": ["q_proj", "rotary_emb"]}), AdapterIncompatible, "ADAPTER_INCOMPATIBLE"
    ),
    "rank-over-max": Case(_config({"r": 512}), AdapterIncompatible, "ADAPTER_INCOMPATIBLE"),
    "size-over-max": Case(IDENTITY, InvalidArgument, "ADAPTER_TOO_LARGE", declared_delta=64 * 1024 * 1024),
    "size-mismatch": Case(IDENTITY, InvalidAdapter, "SIZE_MISMATCH", declared_delta=1),
    "zero-size": Case(lambda c, w: (c, b""), InvalidArgument, "INVALID_SIZE"),
    "peft-type-not-lora": Case(_config({"peft_type": "LOHA"}), InvalidAdapter, "INVALID_ADAPTER"),
    "dora-without-magnitudes": Case(_config({"use_dora": True}), InvalidAdapter, "INVALID_ADAPTER"),
    "config-not-json": Case(lambda c, w: ("{not json", w), InvalidAdapter, "INVALID_ADAPTER"),
    "checksum-mismatch": Case(IDENTITY, InvalidAdapter, "CHECKSUM_MISMATCH", expected_sha256="0" * 64),
    "bad-sha-format": Case(IDENTITY, InvalidArgument, "INVALID_SHA256", expected_sha256="xyz"),
    "trailing-bytes": Case(lambda c, w: (c, w + bytes(16)), InvalidAdapter, "INVALID_ADAPTER"),
    "gap-before-first-tensor": Case(
        lambda c, w: _header(_gap)(c, w[:-4] + bytes(4) + w[-4:]), InvalidAdapter, "INVALID_ADAPTER"
    ),
    "nan-weight": Case(_poison(float("nan")), InvalidAdapter, "NON_FINITE_WEIGHTS"),
    "inf-weight": Case(_poison(float("-inf")), InvalidAdapter, "NON_FINITE_WEIGHTS"),
    "alpha-overflow": Case(_config({"lora_alpha": 1e308}), InvalidAdapter, "LORA_SCALE_OUT_OF_RANGE"),
    "alpha-pattern-out-of-range": Case(
        _config({"alpha_pattern": {"down_proj": 1e6}}), InvalidAdapter, "LORA_SCALE_OUT_OF_RANGE"
    ),
    "rslora-scale-out-of-range": Case(
        _config({"use_rslora": True, "lora_alpha": 40000}), InvalidAdapter, "LORA_SCALE_OUT_OF_RANGE"
    ),
    "wrong-base-model": Case(IDENTITY, AdapterIncompatible, "ADAPTER_INCOMPATIBLE", adapter="acme/wide"),
    "unknown-adapter": Case(IDENTITY, AdapterNotFound, "ADAPTER_NOT_FOUND", adapter="acme/missing"),
}


@pytest.fixture
def small_service(registry_backend: Backend, tmp_path: Path, tiny_models: dict[str, Path]) -> Iterator[RegistryService]:
    """max_adapter_bytes is small so "size over max" needs no big payload."""
    svc = build_service(registry_backend, tmp_path / "spool", RegistryLimits(max_adapter_bytes=1024 * 1024))
    svc.register_base_model("tiny-llama", (tiny_models["llama"] / "config.json").read_text())
    wide = model_config("llama", hidden_size=128, intermediate_size=256).to_dict()
    svc.register_base_model("wide-llama", json.dumps(wide))
    svc.create_adapter("acme/target", "tiny-llama")
    svc.create_adapter("acme/wide", "wide-llama")
    try:
        yield svc
    finally:
        svc.store.close()


def _snapshot(svc: RegistryService) -> tuple[object, ...]:
    return (
        [v.version for v in svc.list_versions("acme/target").items],
        [v.version for v in svc.list_versions("acme/wide").items],
        sorted(b.key for b in svc.blobs.list("sha256/")),
        svc.get_adapter("acme/target"),
        svc.get_adapter("acme/wide"),
    )


@pytest.mark.parametrize("case_name", list(CASES))
def test_bad_upload_is_refused_and_changes_nothing(
    case_name: str, small_service: RegistryService, tiny_adapters: dict[str, dict[str, Path]]
) -> None:
    case = CASES[case_name]
    config, weights = case.mutate(*read_adapter(tiny_adapters["llama"]["all-r8"]))
    before = _snapshot(small_service)
    with pytest.raises(case.error) as info:
        upload(
            small_service,
            case.adapter,
            config,
            weights,
            declared_size=len(weights) + case.declared_delta,
            expected_sha256=case.expected_sha256 if case.expected_sha256 is not None else "",
        )
    assert info.value.reason == case.reason, info.value.message
    assert type(info.value) is case.error, info.value.message
    assert _snapshot(small_service) == before
    # And the registry still accepts a good upload afterwards.
    good_config, good_weights = read_adapter(tiny_adapters["llama"]["qv-r4"])
    assert upload(small_service, "acme/target", good_config, good_weights).version == 1


def test_errors_name_the_tensor_and_shapes(
    small_service: RegistryService, tiny_adapters: dict[str, dict[str, Path]]
) -> None:
    config, weights = CASES["wrong-a-in-features"].mutate(*read_adapter(tiny_adapters["llama"]["all-r8"]))
    with pytest.raises(AdapterIncompatible) as info:
        upload(small_service, "acme/target", config, weights)
    assert A0 in info.value.message and "[8, 32]" in info.value.message and "[8, 64]" in info.value.message
