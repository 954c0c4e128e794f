"""Fixed-capacity integer buffers written on the host and read by kernels on the device.

Why: per-step metadata (token order, segment tables, positions, block tables...) must live at stable device
addresses so a captured CUDA graph keeps reading it, and building it must cost no device allocation. Each field
is a fixed slice of one preallocated host tensor (pinned on CUDA) and of one device tensor; a step writes the
host side through numpy (fast for Python lists), then ``upload`` copies the used prefix of every field written
this step. On CPU the host tensor *is* the device tensor, so uploading costs nothing.

The host side may be rewritten only after the previous step's copies ran; the engine guarantees it, because
every step synchronises with the device when it reads its sampled tokens.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
import torch


class MirroredBuffer:
    """Named fields of one dtype, each ``[capacity]``, mirrored host → device."""

    def __init__(self, capacities: Mapping[str, int], dtype: torch.dtype, device: torch.device) -> None:
        self.device = device
        self.offsets: dict[str, tuple[int, int]] = {}
        total = 0
        for name, capacity in capacities.items():
            if capacity < 0:
                raise ValueError(f"capacity of {name} must be >= 0, got {capacity}")
            self.offsets[name] = (total, capacity)
            total += capacity
        on_cuda = device.type == "cuda"
        self.host = torch.zeros(max(1, total), dtype=dtype, pin_memory=on_cuda)
        self.dev = torch.zeros(max(1, total), dtype=dtype, device=device) if on_cuda else self.host
        self._np: npt.NDArray[np.generic] = self.host.numpy()
        self._used: dict[str, int] = {}

    def capacity(self, name: str) -> int:
        return self.offsets[name][1]

    def host_array(self, name: str, n: int) -> npt.NDArray[np.generic]:
        """The first ``n`` host entries of ``name`` (numpy view, written in place); marks them for upload."""
        start, capacity = self.offsets[name]
        if n > capacity:
            raise ValueError(f"{name}: {n} entries exceed the preallocated capacity {capacity}")
        self._used[name] = n
        return self._np[start : start + n]

    def view(self, name: str, n: int) -> torch.Tensor:
        """The first ``n`` device entries of ``name`` (a view: same address every step)."""
        start, capacity = self.offsets[name]
        if n > capacity:
            raise ValueError(f"{name}: {n} entries exceed the preallocated capacity {capacity}")
        return self.dev[start : start + n]

    def upload(self) -> None:
        """Copy every field written since the last upload to the device (non-blocking; no-op on CPU)."""
        if self.dev is not self.host:
            for name, n in self._used.items():
                if n:
                    start = self.offsets[name][0]
                    self.dev[start : start + n].copy_(self.host[start : start + n], non_blocking=True)
        self._used.clear()
