"""Streaming checks of ``adapter_model.safetensors`` bytes: the loader's header rules, then every weight finite.

Why streaming: an upload is checked chunk by chunk as it arrives, so a file with a NaN in its first tensor is
refused without spooling gigabytes first, and the check costs no second read of the file. The header is parsed
(with ``parse_safetensors_header``: the loader's rules) as soon as its bytes are in; each later byte belongs to
exactly one tensor because the tensors cover the data section exactly, so one cursor walks them in order.

Why bit patterns rather than ``numpy.isfinite``: BF16 has no numpy dtype, and a float of any IEEE-like width is
non-finite (NaN or ±Inf) exactly when all its exponent bits are set. One rule over unsigned integer views covers
F16, BF16, F32 and F64 without converting anything. Non-float tensors are left to the adapter validation (which
refuses them). A NaN or Inf weight can only poison every token that uses the adapter, so it is refused
(``NON_FINITE_WEIGHTS``) before the adapter can become visible.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loraplex.registry.errors import InvalidAdapter
from loraplex.registry.safetensors_header import PREFIX_BYTES, TensorInfo, header_length, parse_safetensors_header

READ_BYTES = 1024 * 1024
# dtype -> (bytes per element, little-endian unsigned view, exponent mask: all bits set = NaN or Inf)
_EXPONENT_MASKS: Mapping[str, tuple[int, str, int]] = {
    "F16": (2, "<u2", 0x7C00),
    "BF16": (2, "<u2", 0x7F80),
    "F32": (4, "<u4", 0x7F80_0000),
    "F64": (8, "<u8", 0x7FF0_0000_0000_0000),
}


@dataclass(frozen=True)
class CheckedWeights:
    """A safetensors file that passed the header rules and the finiteness scan: its size and tensors by name."""

    size: int
    tensors: dict[str, TensorInfo]


class SafetensorsStream:
    """Feed the bytes of one safetensors file of ``total_size`` bytes, in order; ``finish`` when all arrived.

    Raises ``InvalidAdapter`` from ``feed`` as soon as something is wrong: the header (once complete) breaks the
    loader's rules, or a float weight is NaN/Inf. Memory: the header (≤ 100 MB by the loader's own limit) plus
    at most one element's bytes carried across chunk boundaries.
    """

    def __init__(self, total_size: int) -> None:
        self._total = total_size
        self._head = bytearray()
        self._needed = PREFIX_BYTES  # bytes of prefix + header still to collect before the header parses
        self._tensors: dict[str, TensorInfo] | None = None
        self._order: list[tuple[str, TensorInfo]] = []
        self._index = 0
        self._pos = 0  # absolute offset of the next byte
        self._carry = bytearray()  # the start of an element split across two chunks

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        view = memoryview(chunk).cast("B")
        if self._tensors is None:
            view = self._collect_header(view)
        while len(view):
            view = self._scan_some(view)

    def finish(self) -> CheckedWeights:
        """The checked tensors; ``InvalidAdapter`` when fewer than ``total_size`` bytes were fed."""
        if self._tensors is None or self._pos != self._total:
            got = self._pos if self._tensors is not None else len(self._head)
            raise InvalidAdapter(f"safetensors file is truncated: got {got} of {self._total} bytes")
        return CheckedWeights(self._total, self._tensors)

    # -- header ------------------------------------------------------------------------------------------
    def _collect_header(self, view: memoryview) -> memoryview:
        while self._tensors is None and len(view):
            take = min(self._needed - len(self._head), len(view))
            self._head += view[:take]
            view = view[take:]
            self._pos += take
            if len(self._head) < self._needed:
                break
            if self._needed == PREFIX_BYTES:
                if self._total < PREFIX_BYTES:
                    raise InvalidAdapter(f"safetensors file is truncated: {self._total} bytes is shorter than 8")
                self._needed = PREFIX_BYTES + header_length(bytes(self._head), self._total)
                continue
            self._tensors = parse_safetensors_header(bytes(self._head), self._total)
            self._order = sorted(self._tensors.items(), key=lambda item: (item[1].start, item[1].end))
            self._head = bytearray()
        return view

    # -- data ----------------------------------------------------------------------------------------------
    def _scan_some(self, view: memoryview) -> memoryview:
        """Check the part of ``view`` that belongs to the current tensor; return the rest."""
        while self._index < len(self._order) and self._order[self._index][1].end <= self._pos:
            self._index += 1  # done with it (empty tensors are done before they start)
        if self._index == len(self._order):
            raise InvalidAdapter(f"safetensors file has bytes beyond its declared {self._total} bytes")
        name, info = self._order[self._index]
        piece = view[: info.end - self._pos]
        mask = _EXPONENT_MASKS.get(info.dtype)
        if mask is not None:
            self._check_finite(name, info, piece, mask)
        self._pos += len(piece)
        return view[len(piece) :]

    def _check_finite(self, name: str, info: TensorInfo, piece: memoryview, mask: tuple[int, str, int]) -> None:
        size = mask[0]
        pos = self._pos
        if self._carry:
            need = size - len(self._carry)
            self._carry += piece[:need]
            pos += min(need, len(piece))
            piece = piece[need:]
            if len(self._carry) < size:
                return
            _require_finite(name, info, bytes(self._carry), pos - size, mask)
            self._carry.clear()
        whole = len(piece) // size * size
        if whole:
            _require_finite(name, info, piece[:whole], pos, mask)
        self._carry += piece[whole:]


def _require_finite(
    name: str, info: TensorInfo, data: bytes | memoryview, pos: int, mask: tuple[int, str, int]
) -> None:
    """``data`` holds whole elements of ``info`` starting at absolute offset ``pos``."""
    size, view_dtype, exponent = mask
    bits = np.frombuffer(data, dtype=view_dtype)
    bad = (bits & exponent) == exponent
    if bad.any():
        element = (pos - info.start) // size + int(np.argmax(bad))
        raise InvalidAdapter(
            f"tensor {name!r} holds a non-finite value (NaN or Inf) at element {element}: adapter weights must be "
            "finite",
            reason="NON_FINITE_WEIGHTS",
        )


def check_weights_file(path: Path, size: int) -> CheckedWeights:
    """Run the streaming checks over a file already on disk (callers that did not check while receiving)."""
    stream = SafetensorsStream(size)
    with open(path, "rb") as handle:
        while chunk := handle.read(READ_BYTES):
            stream.feed(chunk)
    return stream.finish()


def check_weights_bytes(data: bytes | bytearray | memoryview) -> CheckedWeights:
    """The same checks over a whole file in memory (e.g. a loader that downloaded it)."""
    stream = SafetensorsStream(len(data))
    stream.feed(data)
    return stream.finish()


__all__ = ["CheckedWeights", "SafetensorsStream", "check_weights_bytes", "check_weights_file"]
