"""The device pool's DoRA part: per-column factors of the resident DoRA adapters, beside their rank-rows.

PEFT's DoRA output per module is ``y = f ⊙ (W x + s·B A x) + bias`` with ``f = m / ‖W + s·B A‖`` per output
column (``engine/adapters/dora.py``). ``f`` depends only on the base weight and the adapter, so it is computed
once, when the adapter is loaded into the device pool, and applied per token by the LoRA layers (one gathered
multiply of the DoRA tokens' columns). Plain LoRA tokens and base rows never touch it.

Storage: one factor row per resident DoRA adapter (``capacity`` of them), the same row index in every module's
``[capacity, h_out]`` float32 buffer; ``row_of_slot[s]`` is the row of pool slot ``s`` (-1 = not DoRA). Rows are
taken and given back with the adapter's slot, so a failed load or an eviction never leaks one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from loraplex.engine.adapters.types import ModuleKey, ModuleLoRA
from loraplex.registry.errors import AdapterIncompatible

# Computes f [h_out] for one module of a DoRA adapter from the base weight (set by the engine core, which has it).
FactorFn = Callable[[ModuleKey, ModuleLoRA], torch.Tensor]


class DoraStore:
    def __init__(
        self,
        module_widths: dict[ModuleKey, int],
        num_slots: int,
        capacity: int,
        device: torch.device,
    ) -> None:
        self.capacity = capacity
        self.factors: dict[ModuleKey, torch.Tensor] = {
            mk: torch.ones(capacity, width, dtype=torch.float32, device=device)
            for mk, width in module_widths.items()
            if mk[0] is not None  # DoRA is served on the decoder's linear modules only
        }
        self.row_of_slot: list[int] = [-1] * num_slots
        self._free = list(range(capacity))
        self.factor_fn: FactorFn | None = None
        self.version = 0  # bumped when any slot's DoRA row changes (the runner's per-step tables follow it)

    @property
    def free_rows(self) -> int:
        return len(self._free)

    def check(self, modules: Iterable[tuple[ModuleKey, ModuleLoRA]]) -> None:
        """Refuse a DoRA adapter this engine cannot run: no capacity, no base weights, an unsupported module."""
        dora = [(mk, lora) for mk, lora in modules if lora.magnitude is not None]
        if not dora:
            return
        if self.capacity == 0 or self.factor_fn is None:
            raise AdapterIncompatible("this engine serves no DoRA adapters (DoRA capacity 0)")
        for mk, _ in dora:
            if mk not in self.factors:
                raise AdapterIncompatible(f"DoRA on {mk[1]} is not supported (only the decoder's linear modules)")

    def load(self, slot: int, modules: Iterable[tuple[ModuleKey, ModuleLoRA]]) -> None:
        """Compute and store the factors of a DoRA adapter for ``slot`` (a no-op for plain LoRA).

        On failure nothing stays taken: the caller's rollback calls ``release(slot)``.
        """
        dora = [(mk, lora) for mk, lora in modules if lora.magnitude is not None]
        if not dora:
            return
        if not self._free or self.factor_fn is None:
            raise AdapterIncompatible("no free DoRA factor row (all DoRA capacity is in use)")
        row = self._free.pop(0)
        self.row_of_slot[slot] = row
        self.version += 1
        for mk, lora in dora:
            self.factors[mk][row] = self.factor_fn(mk, lora).to(torch.float32)

    def release(self, slot: int) -> None:
        """Give back ``slot``'s factor row (if any) and reset it to ones."""
        row = self.row_of_slot[slot]
        if row < 0:
            return
        for buffer in self.factors.values():
            buffer[row] = 1.0
        self.row_of_slot[slot] = -1
        self._free.append(row)
        self._free.sort()
        self.version += 1
