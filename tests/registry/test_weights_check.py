"""The streaming weights check: every NaN/Inf found, in any dtype the registry accepts, however the bytes are cut.

Oracle: torch's ``isfinite`` on the tensors the ``safetensors`` library loads from the same bytes.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from loraplex.registry.errors import InvalidAdapter
from loraplex.registry.weights_check import SafetensorsStream, check_weights_bytes, check_weights_file
from tests.fixtures.hf import read_adapter

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
CHUNKINGS = [1, 3, 5, 7, 64, 4096, 1 << 30]


def _feed(data: bytes, chunk: int) -> None:
    stream = SafetensorsStream(len(data))
    for i in range(0, len(data), chunk):
        stream.feed(data[i : i + chunk])
    stream.finish()


def _file_with(dtype: torch.dtype, bad_index: int | None, value: float) -> bytes:
    gen = torch.Generator().manual_seed(0)
    first = torch.randn(3, 5, generator=gen).to(dtype)
    second = torch.randn(7, 3, generator=gen).to(dtype)
    if bad_index is not None:
        second.view(-1)[bad_index] = value
    return save_safetensors({"first": first, "second": second, "ints": torch.arange(6, dtype=torch.int32)})


def _oracle_first_bad(data: bytes) -> tuple[str, int] | None:
    for name, tensor in sorted(load_safetensors(data).items()):
        if tensor.is_floating_point():
            bad = (~torch.isfinite(tensor.view(-1))).nonzero()
            if len(bad):
                return name, int(bad[0])
    return None


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("chunk", CHUNKINGS)
def test_non_finite_weights_are_found_however_the_stream_is_cut(dtype: str, value: float, chunk: int) -> None:
    for index in (0, 10, 20):
        data = _file_with(DTYPES[dtype], index, value)
        assert _oracle_first_bad(data) == ("second", index)
        with pytest.raises(InvalidAdapter) as info:
            _feed(data, chunk)
        assert info.value.reason == "NON_FINITE_WEIGHTS"
        assert "'second'" in info.value.message and f"element {index}" in info.value.message


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("chunk", CHUNKINGS)
def test_finite_extremes_pass(dtype: str, chunk: int) -> None:
    info = torch.finfo(DTYPES[dtype])
    extremes = torch.tensor([info.max, -info.max, info.tiny, info.tiny / 4, -0.0, 0.0], dtype=torch.float64)
    data = save_safetensors({"x": extremes.to(DTYPES[dtype])})
    assert _oracle_first_bad(data) is None
    _feed(data, chunk)


def test_integer_tensors_are_not_scanned_as_floats() -> None:
    """0x7F800000 is a NaN's bit pattern in F32 but a plain number in I32: only float dtypes are checked."""
    data = save_safetensors({"x": torch.tensor([0x7F800000, -1], dtype=torch.int32)})
    _feed(data, 3)


def test_real_peft_adapters_pass_and_a_poisoned_one_is_refused(
    tiny_adapters: dict[str, dict[str, Path]], tmp_path: Path
) -> None:
    for arch, adapters in tiny_adapters.items():
        for name, folder in adapters.items():
            _, weights = read_adapter(folder)
            checked = check_weights_bytes(weights)
            assert checked.size == len(weights), (arch, name)
            assert set(checked.tensors) == set(load_safetensors(weights)), (arch, name)
    _, weights = read_adapter(tiny_adapters["llama"]["all-r8"])
    tensors = load_safetensors(weights)
    victim = sorted(tensors)[-1]
    tensors[victim].view(-1)[-1] = math.inf  # the very last element of the file's last tensor
    poisoned = tmp_path / "poisoned.safetensors"
    poisoned.write_bytes(save_safetensors(tensors))
    with pytest.raises(InvalidAdapter) as info:
        check_weights_file(poisoned, poisoned.stat().st_size)
    assert info.value.reason == "NON_FINITE_WEIGHTS" and victim in info.value.message


def test_a_short_stream_is_truncated_not_accepted() -> None:
    data = _file_with(torch.float32, None, 0.0)
    stream = SafetensorsStream(len(data))
    stream.feed(data[:-4])
    with pytest.raises(InvalidAdapter, match="truncated"):
        stream.finish()
    header_only = SafetensorsStream(len(data))
    header_only.feed(data[:5])
    with pytest.raises(InvalidAdapter, match="truncated"):
        header_only.finish()
