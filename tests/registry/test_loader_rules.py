"""The registry refuses exactly the safetensors layouts the loader refuses: the ``safetensors`` library is the oracle.

Why: a file the registry accepts but the engine's loader refuses ("file not fully covered") would become READY and
then fail on every engine forever. The header parser and the streaming upload check must agree with the library.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest

from loraplex.registry.errors import InvalidAdapter
from loraplex.registry.safetensors_header import parse_safetensors_header
from loraplex.registry.weights_check import check_weights_bytes

Entry = tuple[str, list[int], tuple[int, int]]


def _file(entries: dict[str, Entry], data_len: int, pad: bytes = b"") -> bytes:
    header: dict[str, Any] = {
        name: {"dtype": dtype, "shape": shape, "data_offsets": list(offsets)}
        for name, (dtype, shape, offsets) in entries.items()
    }
    raw = json.dumps(header).encode() + pad
    return struct.pack("<Q", len(raw)) + raw + bytes(data_len)


# name -> (file bytes, whether the loader accepts it)
LAYOUTS: dict[str, tuple[bytes, bool]] = {
    "packed": (_file({"a": ("F32", [2], (0, 8)), "b": ("F32", [2], (8, 16))}, 16), True),
    "packed-any-header-order": (_file({"b": ("F32", [2], (8, 16)), "a": ("F32", [2], (0, 8))}, 16), True),
    "header-padded-with-spaces": (_file({"a": ("F32", [2], (0, 8))}, 8, pad=b"   "), True),
    "trailing-bytes": (_file({"a": ("F32", [2], (0, 8))}, 12), False),
    "trailing-byte-no-tensors": (_file({}, 1), False),
    "gap-at-start": (_file({"a": ("F32", [2], (4, 12))}, 12), False),
    "gap-between": (_file({"a": ("F32", [1], (0, 4)), "b": ("F32", [1], (8, 12))}, 12), False),
    "overlap": (_file({"a": ("F32", [2], (0, 8)), "b": ("F32", [1], (4, 8))}, 8), False),
    "empty-tensor-at-end": (_file({"a": ("F32", [2], (0, 8)), "e": ("F32", [0], (8, 8))}, 8), True),
    "empty-tensor-between": (
        _file({"a": ("F32", [1], (0, 4)), "e": ("F32", [0], (4, 4)), "b": ("F32", [1], (4, 8))}, 8),
        True,
    ),
    "empty-tensor-inside-another": (_file({"a": ("F32", [2], (0, 8)), "e": ("F32", [0], (4, 4))}, 8), False),
    "no-tensors": (_file({}, 0), True),
    "header-nul-padded": (_file({"a": ("F32", [2], (0, 8))}, 8, pad=b"\0\0"), False),
}


def _loader_accepts(data: bytes) -> bool:
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        load(data)
    except SafetensorError:
        return False
    return True


def _registry_accepts(data: bytes) -> bool:
    try:
        parse_safetensors_header(data, len(data))
    except InvalidAdapter:
        return False
    return True


def _stream_accepts(data: bytes) -> bool:
    try:
        check_weights_bytes(data)
    except InvalidAdapter:
        return False
    return True


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_header_rules_match_the_safetensors_loader(layout: str) -> None:
    data, accepted = LAYOUTS[layout]
    assert _loader_accepts(data) is accepted, "the oracle changed its mind: update LAYOUTS"
    assert _registry_accepts(data) is accepted
    assert _stream_accepts(data) is accepted


def test_trailing_bytes_are_named_in_the_error() -> None:
    data, _ = LAYOUTS["trailing-bytes"]
    with pytest.raises(InvalidAdapter, match="4 bytes after its last tensor"):
        parse_safetensors_header(data, len(data))
    data, _ = LAYOUTS["gap-between"]
    with pytest.raises(InvalidAdapter, match="4 unused bytes before tensor 'b'"):
        parse_safetensors_header(data, len(data))


def test_header_limit_is_the_loaders() -> None:
    """The loader's MAX_HEADER_SIZE is 100,000,000 bytes; a larger announced header is refused from the prefix."""
    data = struct.pack("<Q", 100_000_001) + b"{}"
    with pytest.raises(InvalidAdapter, match="exceeds the limit of 100000000"):
        parse_safetensors_header(data, 200_000_000)


def test_shape_products_that_overflow_64_bits_are_refused() -> None:
    """The loader multiplies shapes with checked u64 arithmetic: a later zero dimension does not rescue it."""
    data = _file({"a": ("F32", [2**40, 2**40, 0], (0, 0))}, 0)
    assert not _loader_accepts(data)
    with pytest.raises(InvalidAdapter, match="overflows 64 bits"):
        parse_safetensors_header(data, len(data))
