"""Small helpers for registry tests: upload bytes the way the servicer does, rebuild safetensors files."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from typing import Any

from loraplex.registry.entities import AdapterVersion
from loraplex.registry.service import RegistryService

ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "F64": 8}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def upload(
    svc: RegistryService,
    adapter: str,
    config: str,
    weights: bytes,
    *,
    declared_size: int | None = None,
    expected_sha256: str = "",
    request_id: str = "",
) -> AdapterVersion:
    """begin_upload -> spool the bytes to the service's spool dir -> finish_upload (like the servicer)."""
    plan = svc.begin_upload(
        adapter, config, len(weights) if declared_size is None else declared_size, expected_sha256, request_id
    )
    if plan.settled and plan.existing is not None:
        return plan.existing
    spool = svc.new_spool_file()
    try:
        spool.write_bytes(weights)
        return svc.finish_upload(plan, spool, sha256(weights))
    finally:
        spool.unlink(missing_ok=True)


def read_header(data: bytes) -> dict[str, Any]:
    (n,) = struct.unpack("<Q", data[:8])
    header: dict[str, Any] = json.loads(data[8 : 8 + n])
    return header


def with_header(data: bytes, header: Mapping[str, Any]) -> bytes:
    """Same data section, new header (offsets are relative to the data section, so they stay valid)."""
    (n,) = struct.unpack("<Q", data[:8])
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def build_safetensors(entries: Mapping[str, tuple[str, list[int]]]) -> bytes:
    """A well-formed file with the given (dtype, shape) per tensor and zero data, packed in order."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in entries.items():
        size = ITEMSIZE[dtype]
        for dim in shape:
            size *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(offset)


def entries_of(data: bytes) -> dict[str, tuple[str, list[int]]]:
    """(dtype, shape) per tensor of a real file, in file order, to mutate and rebuild."""
    header = read_header(data)
    header.pop("__metadata__", None)
    ordered = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
    return {name: (entry["dtype"], list(entry["shape"])) for name, entry in ordered}
