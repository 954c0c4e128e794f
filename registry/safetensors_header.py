"""Bounded, torch-free parsing of a safetensors header.

Why by hand: the registry validates uploads without torch or the ``safetensors`` package, and it must never
trust a length field from the wire. Every number is checked against the real file size before anything is
allocated, so a hostile 8-byte prefix cannot make us read or allocate gigabytes.

Format: ``u64 little-endian N`` + ``N`` bytes of UTF-8 JSON object (tensor name -> {dtype, shape,
data_offsets}, plus an optional ``__metadata__`` str->str map) + the data section. File offsets in
``data_offsets`` are relative to the data section.

The rules are the loader's (the ``safetensors`` library the engine loads with), so the registry never accepts a
file the engine would refuse: header at most 100,000,000 bytes, offsets relative to the data section, and the
tensors, ordered by offset, must cover the data section exactly — no gap, no overlap, no trailing byte ("file not
fully covered"). We are stricter in a few harmless places (unknown entry fields, repeated keys).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Any

from loraplex.registry.errors import InvalidAdapter

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's MAX_HEADER_SIZE
MAX_USIZE = 2**64 - 1  # the loader's shape and size arithmetic is u64: a larger product overflows there
METADATA_KEY = "__metadata__"
PREFIX_BYTES = 8

# Bits per element for every dtype the safetensors format defines.
DTYPE_BITS: Mapping[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E4M3": 8,
    "F8_E5M2": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry; ``start``/``end`` are ABSOLUTE offsets in the file, so readers seek directly."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _read_exact(source: bytes | bytearray | memoryview | IO[bytes], offset: int, size: int) -> bytes:
    if isinstance(source, bytes | bytearray | memoryview):
        chunk = bytes(source[offset : offset + size])
    else:
        source.seek(offset)
        parts: list[bytes] = []
        remaining = size
        while remaining > 0:
            part = source.read(remaining)
            if not part:
                break
            parts.append(part)
            remaining -= len(part)
        chunk = b"".join(parts)
    if len(chunk) != size:
        raise InvalidAdapter(f"safetensors file is truncated: wanted {size} bytes at offset {offset}, got {len(chunk)}")
    return chunk


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise InvalidAdapter(f"safetensors header repeats key {key!r}")
        out[key] = value
    return out


def _check_metadata(value: Any) -> None:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise InvalidAdapter("safetensors __metadata__ must be an object of string to string")


def _tensor_info(name: str, entry: Any, data_start: int, data_len: int) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise InvalidAdapter(f"safetensors entry {name!r} must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise InvalidAdapter(f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InvalidAdapter(f"tensor {name!r} has invalid shape {shape!r}: expected a list of non-negative ints")
    numel = 1
    for dim in shape:  # step by step, like the loader's checked multiplication (a later 0 does not save it)
        numel *= dim
        if numel > MAX_USIZE:
            raise InvalidAdapter(f"tensor {name!r} has shape {shape!r} whose element count overflows 64 bits")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise InvalidAdapter(f"tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise InvalidAdapter(
            f"tensor {name!r} data_offsets [{begin}, {end}] fall outside the data section of {data_len} bytes"
        )
    expected = (numel * DTYPE_BITS[dtype] + 7) // 8
    if end - begin != expected:
        raise InvalidAdapter(f"tensor {name!r} occupies {end - begin} bytes but {dtype}{shape} needs {expected} bytes")
    return TensorInfo(dtype=dtype, shape=tuple(shape), start=data_start + begin, end=data_start + end)


def header_length(prefix: bytes, total_size: int) -> int:
    """The header length the 8-byte ``prefix`` announces, checked against the limit and the file size."""
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > MAX_HEADER_BYTES:
        raise InvalidAdapter(f"safetensors header length {header_len} exceeds the limit of {MAX_HEADER_BYTES}")
    if header_len > total_size - PREFIX_BYTES:
        raise InvalidAdapter(f"safetensors header length {header_len} is larger than the file ({total_size} bytes)")
    return int(header_len)


def parse_safetensors_header(
    data: bytes | bytearray | memoryview | IO[bytes], total_size: int
) -> dict[str, TensorInfo]:
    """Validate the header of a safetensors file of ``total_size`` bytes and return its tensors by name.

    ``data`` is either the whole file (or at least its header) as bytes, or a seekable binary file object.
    Raises ``InvalidAdapter`` for anything malformed: truncation, oversize header, bad JSON, unknown dtype,
    negative dims, offsets outside the data section, length != prod(shape) * itemsize, and a data section not
    exactly covered by its tensors (overlaps, gaps, trailing bytes).
    """
    if total_size < PREFIX_BYTES:
        raise InvalidAdapter(f"safetensors file is truncated: {total_size} bytes is shorter than the 8-byte prefix")
    header_len = header_length(_read_exact(data, 0, PREFIX_BYTES), total_size)
    raw = _read_exact(data, PREFIX_BYTES, header_len)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidAdapter(f"safetensors header is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise InvalidAdapter("safetensors header must be a JSON object")
    data_start = PREFIX_BYTES + header_len
    data_len = total_size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == METADATA_KEY:
            _check_metadata(entry)
            continue
        tensors[name] = _tensor_info(name, entry, data_start, data_len)
    _check_exact_cover(tensors, data_start, total_size)
    return tensors


def _check_exact_cover(tensors: Mapping[str, TensorInfo], data_start: int, total_size: int) -> None:
    """The loader's layout rule: ordered by (start, end), each tensor begins where the previous one ended, the
    first at the start of the data section, and the last ends at the end of the file (empty tensors included)."""
    cursor, previous = data_start, ""
    for start, end, name in sorted((info.start, info.end, name) for name, info in tensors.items()):
        if start < cursor:
            raise InvalidAdapter(f"tensors {previous!r} and {name!r} overlap in the data section")
        if start > cursor:
            raise InvalidAdapter(
                f"the data section has {start - cursor} unused bytes before tensor {name!r}: tensors must cover it "
                "exactly (the safetensors loader refuses gaps)"
            )
        cursor, previous = end, name
    if cursor != total_size:
        raise InvalidAdapter(
            f"the data section has {total_size - cursor} bytes after its last tensor: tensors must cover it exactly "
            "(the safetensors loader refuses a file not fully covered)"
        )
