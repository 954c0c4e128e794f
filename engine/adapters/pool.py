"""The device tier: a fixed set of slots over rank-exact row buffers, one pair per (layer, module).

Why rank-exact rows: an adapter of rank r takes exactly r rows of each buffer it targets (found through
``row_table``), so rank 4 and rank 64 adapters share one budget without padding, and the kernels' work follows
each adapter's own rank. Slots exist only so a token can name its adapter with one small integer.

Lifecycle: ``acquire`` makes an adapter resident (loading it, evicting least-recently-used *unreferenced*
residents if rows or slots run short) and counts a reference; ``release`` drops it. Unreferenced residents stay
loaded as a cache until their rows are wanted (residents some waiting request still wants go last). Eviction
zeroes the rows and resets the slot's ranks to 0 in every buffer, so a reused slot can never read a previous
adapter's weights or rank. A load is transactional: if any copy fails (a value the dtype cannot hold, a device
error) every row and the slot it took are given back and zeroed before the typed error is raised, so one bad
adapter can never leak capacity. Not thread-safe: only the step thread calls it (through ``AdapterResidency``).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch

from loraplex.engine.adapters.dora_store import DoraStore
from loraplex.engine.adapters.types import ModuleKey, ModuleLoRA
from loraplex.kernels.types import LoRAModuleWeights
from loraplex.registry.errors import AdapterIncompatible, ResourceExhausted
from loraplex.registry.spec import EMBEDDING_MODULES, LINEAR_MODULES, ModelSpec


class PoolAdapter(Protocol):
    """The pool's view of an adapter (``HostAdapter`` satisfies it)."""

    @property
    def modules(self) -> Mapping[ModuleKey, ModuleLoRA]: ...


@dataclass
class _Resident:
    key: str
    slot: int
    rows: dict[ModuleKey, list[int]]
    max_rank: int
    nbytes: int
    refcount: int = 0
    last_used: int = 0


@dataclass(frozen=True)
class ResidentInfo:
    key: str
    slot: int
    rank: int
    nbytes: int
    refcount: int


@dataclass
class _RowAllocator:
    """Free rows of one buffer, lowest first so a fresh pool fills densely.

    A min-heap: taking or giving r rows costs O(r log rows), not a copy of the whole free list (a 1 GiB pool
    has ~10^4 rows per buffer, and a load touches every buffer).
    """

    free: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        heapq.heapify(self.free)

    def take(self, n: int) -> list[int]:
        return [heapq.heappop(self.free) for _ in range(min(n, len(self.free)))]

    def give(self, rows: Iterable[int]) -> None:
        for row in rows:
            heapq.heappush(self.free, row)


def pool_module_keys(spec: ModelSpec, embeddings: bool) -> list[ModuleKey]:
    keys: list[ModuleKey] = [(i, m) for i in range(spec.num_hidden_layers) for m in LINEAR_MODULES]
    if embeddings:
        keys.extend((None, m) for m in EMBEDDING_MODULES)
    return keys


def bytes_per_row(spec: ModelSpec, embeddings: bool, element_size: int) -> int:
    """Bytes one rank-row costs across every buffer (A row + Bᵀ row per (layer, module))."""
    shapes = spec.module_shapes()
    return sum((shapes[m][0] + shapes[m][1]) * element_size for _, m in pool_module_keys(spec, embeddings))


class AdapterPool:
    def __init__(
        self,
        spec: ModelSpec,
        *,
        num_slots: int,
        rows: int,
        max_rank: int,
        device: torch.device,
        dtype: torch.dtype,
        embeddings: bool = True,
        dora_capacity: int = 0,
    ) -> None:
        if rows < max_rank:
            raise ResourceExhausted(f"adapter pool of {rows} rows cannot hold one adapter of rank {max_rank}")
        self.num_slots, self.num_rows, self.max_rank = num_slots, rows, max_rank
        self.device, self.dtype = device, dtype
        shapes = spec.module_shapes()
        self.weights: dict[ModuleKey, LoRAModuleWeights] = {}
        self._alloc: dict[ModuleKey, _RowAllocator] = {}
        for key in pool_module_keys(spec, embeddings):
            h_in, h_out = shapes[key[1]]
            self.weights[key] = LoRAModuleWeights(
                a_rows=torch.zeros(rows, h_in, dtype=dtype, device=device),
                b_rows=torch.zeros(rows, h_out, dtype=dtype, device=device),
                row_table=torch.zeros(num_slots, max_rank, dtype=torch.int32, device=device),
                ranks=torch.zeros(num_slots, dtype=torch.int32, device=device),
                scales=torch.zeros(num_slots, dtype=torch.float32, device=device),
            )
            self._alloc[key] = _RowAllocator(list(range(rows)))
        widths = {key: int(w.b_rows.shape[1]) for key, w in self.weights.items()}
        self.dora = DoraStore(widths, num_slots, dora_capacity, device)
        self._residents: dict[str, _Resident] = {}
        self._free_slots = list(range(num_slots))
        self._clock = 0
        # Whether a waiting request wants this resident (set by the owner; used to order evictions).
        self.wanted: Callable[[str], bool] = lambda key: False
        # The slot of the merged adapter's negated delta while an adapter is folded into the base (set by the core).
        self.merged_slot: int | None = None

    # ---- queries -------------------------------------------------------------------------------------------
    def slot_of(self, key: str) -> int | None:
        resident = self._residents.get(key)
        return None if resident is None else resident.slot

    def residents(self) -> list[ResidentInfo]:
        return [
            ResidentInfo(r.key, r.slot, r.max_rank, r.nbytes, r.refcount)
            for r in sorted(self._residents.values(), key=lambda r: r.slot)
        ]

    def refcount(self, key: str) -> int:
        resident = self._residents.get(key)
        return 0 if resident is None else resident.refcount

    def check_compatible(self, adapter: PoolAdapter) -> None:
        """Raise ``AdapterIncompatible`` if the adapter targets a module this pool has no buffer for."""
        self.dora.check(adapter.modules.items())
        for mk, lora in adapter.modules.items():
            if mk not in self.weights:
                raise AdapterIncompatible(f"adapter targets {mk[1]} (layer {mk[0]}), which this pool does not hold")
            if lora.rank > self.max_rank:
                raise AdapterIncompatible(f"adapter rank {lora.rank} exceeds the pool's max rank {self.max_rank}")

    def _victims(self, adapter: PoolAdapter, evict: bool = True) -> list[_Resident] | None:
        """The LRU unreferenced residents to evict so ``adapter`` fits; None if it cannot fit now.

        Residents that ``wanted`` says a waiting request needs are evicted only after every other idle one.
        With ``evict=False`` only free rows and slots count (staging never displaces anything).
        """
        need = {mk: lora.rank for mk, lora in adapter.modules.items()}
        free = {mk: len(self._alloc[mk].free) for mk in need}
        slots = len(self._free_slots)
        dora_need = int(any(lora.magnitude is not None for lora in adapter.modules.values()))
        dora_free = self.dora.free_rows
        victims: list[_Resident] = []
        idle = [r for r in self._residents.values() if r.refcount == 0] if evict else []
        candidates = sorted(idle, key=lambda r: (self.wanted(r.key), r.last_used))
        for candidate in [None, *candidates]:
            if candidate is not None:
                victims.append(candidate)
                slots += 1
                dora_free += int(self.dora.row_of_slot[candidate.slot] >= 0)
                for mk, rows in candidate.rows.items():
                    if mk in free:
                        free[mk] += len(rows)
            if slots > 0 and dora_free >= dora_need and all(free[mk] >= n for mk, n in need.items()):
                return victims
        return None

    def can_acquire(self, key: str, adapter: PoolAdapter) -> bool:
        return key in self._residents or self._victims(adapter) is not None

    def stage(self, key: str, adapter: PoolAdapter) -> bool:
        """Load ``key`` into free rows and a free slot without a reference (nothing is evicted for it).

        Why: the host-to-device copy then happens when the adapter arrives, not on the step that admits its first
        request. Returns whether it is resident now.
        """
        if key in self._residents:
            return True
        self.check_compatible(adapter)
        if self._victims(adapter, evict=False) is None:
            return False
        self._clock += 1
        self._load(key, adapter).last_used = self._clock
        return True

    # ---- mutations -----------------------------------------------------------------------------------------
    def acquire(self, key: str, adapter: PoolAdapter) -> int:
        """Make ``key`` resident (loading ``adapter`` if needed), add a reference, return its slot."""
        self._clock += 1
        resident = self._residents.get(key)
        if resident is None:
            self.check_compatible(adapter)
            victims = self._victims(adapter)
            if victims is None:
                raise ResourceExhausted(f"adapter pool has no room for {key} (all residents in use)")
            for victim in victims:
                self.evict(victim.key)
            resident = self._load(key, adapter)
        resident.refcount += 1
        resident.last_used = self._clock
        return resident.slot

    def release(self, key: str) -> None:
        resident = self._residents.get(key)
        if resident is None or resident.refcount == 0:
            raise ValueError(f"release of {key} without a matching acquire")
        resident.refcount -= 1

    def evict(self, key: str) -> None:
        """Unload an unreferenced resident: zero its rows, reset its slot everywhere, free rows and slot."""
        resident = self._residents.get(key)
        if resident is None:
            return
        if resident.refcount:
            raise ValueError(f"cannot evict {key}: {resident.refcount} sequences use it")
        del self._residents[key]
        self._clear(resident.slot, resident.rows)

    def _load(self, key: str, adapter: PoolAdapter) -> _Resident:
        slot = self._free_slots.pop(0)
        taken: dict[ModuleKey, list[int]] = {}
        try:
            nbytes = self._write_slot(slot, adapter, taken)
            self.dora.load(slot, adapter.modules.items())
        except Exception as exc:
            self._clear(slot, taken)
            raise AdapterIncompatible(
                f"adapter {key} cannot be loaded into the device pool: {exc}", reason="ADAPTER_LOAD_FAILED"
            ) from exc
        resident = _Resident(key, slot, taken, max((len(r) for r in taken.values()), default=0), nbytes)
        self._residents[key] = resident
        return resident

    def _write_slot(self, slot: int, adapter: PoolAdapter, taken: dict[ModuleKey, list[int]]) -> int:
        """Copy every module's rows in and fill the slot's tables; records rows in ``taken`` as it goes."""
        nbytes = 0
        for mk, w in self.weights.items():
            lora = adapter.modules.get(mk)
            w.row_table[slot].zero_()
            if lora is None:
                # Not targeted: rank 0 means the kernels skip this slot for this module.
                w.ranks[slot] = 0
                w.scales[slot] = 0.0
                continue
            r = lora.rank
            if not math.isfinite(lora.scale):
                raise ValueError(f"scale {lora.scale!r} of {mk[1]} is not finite")
            rows = self._alloc[mk].take(r)
            taken[mk] = rows
            index = torch.tensor(rows, dtype=torch.long, device=self.device)
            w.a_rows.index_copy_(0, index, lora.a.to(device=self.device, dtype=self.dtype))  # [r, h_in]
            w.b_rows.index_copy_(0, index, lora.b.t().to(device=self.device, dtype=self.dtype))  # [r, h_out]
            w.row_table[slot, :r] = index.to(torch.int32)
            w.ranks[slot] = r
            w.scales[slot] = lora.scale
            nbytes += r * (w.a_rows.shape[1] + w.b_rows.shape[1]) * w.a_rows.element_size()
        return nbytes

    def _clear(self, slot: int, taken: Mapping[ModuleKey, list[int]]) -> None:
        """Zero and return every row in ``taken``, reset the slot everywhere (DoRA row too), free the slot.

        The one way a slot is given back: an eviction and the rollback of a failed load both end here.
        """
        for mk, w in self.weights.items():
            rows = taken.get(mk)
            if rows:
                index = torch.tensor(rows, dtype=torch.long, device=self.device)
                w.a_rows.index_fill_(0, index, 0)
                w.b_rows.index_fill_(0, index, 0)
                self._alloc[mk].give(rows)
            w.ranks[slot] = 0
            w.scales[slot] = 0.0
            w.row_table[slot].zero_()
        self.dora.release(slot)
        self._free_slots.append(slot)
        self._free_slots.sort()
