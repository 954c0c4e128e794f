"""``AdapterResidency``: the one owner of where adapters live in the engine — host tier and device pool.

Why one owner: an adapter's host copy, its device rows, its pins, its byte budgets and the count of live requests
that need it are one piece of state; split over several objects and threads they drift (an adapter evicted from
the host under a waiting request, a pin the device pool never hears of). Everything here runs on the engine's
step thread: the event loop reaches it only through ``LLMEngine`` commands, and reads the immutable
``ResidentView`` snapshots the engine publishes.

- Host tier: parsed adapters by key (the version digest), LRU within ``host_budget_bytes``. An entry that live
  requests use (``users``) or that is pinned is never evicted; adding an adapter that cannot fit raises
  ``ResourceExhausted`` (``HOST_CACHE_FULL``) and changes nothing.
- Device pool: ``AdapterPool`` (rank-exact rows). A new host entry is staged into free device rows at once when
  they exist (never displacing anything), so the copy is off the admission path; admission then only references
  it. Residents some waiting request wants are the last evicted.
- Failure: a device load that fails (``AdapterIncompatible`` from the pool, after its own rollback) makes the
  caller drop the entry with ``discard`` so the adapter is never retried in a loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from loraplex.engine.adapters.host import HostAdapter
from loraplex.engine.adapters.pool import AdapterPool
from loraplex.registry.errors import FailedPrecondition, ResourceExhausted


@dataclass(frozen=True)
class AdapterInfo:
    """How clients know an adapter (for listings and metrics); empty for adapters added without a registry."""

    adapter: str = ""  # "namespace/name"
    version: int = 0
    rank: int = 0


@dataclass
class _HostEntry:
    adapter: HostAdapter
    info: AdapterInfo
    nbytes: int
    last_used: float
    pinned: bool = False


@dataclass(frozen=True)
class ResidentView:
    """One host-resident adapter at snapshot time (immutable; safe to read from any thread)."""

    key: str
    info: AdapterInfo
    nbytes: int  # host bytes
    slot: int | None  # device pool slot, None when only on the host
    device_bytes: int
    refcount: int  # running sequences holding its device slot
    users: int  # live requests (waiting or running) that name it
    pinned: bool
    last_used: float  # time.monotonic() of its last use


class AdapterResidency:
    def __init__(
        self, pool: AdapterPool, host_budget_bytes: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.pool = pool
        self.host_budget = host_budget_bytes
        self._clock = clock
        self._host: dict[str, _HostEntry] = {}
        self._users: dict[str, int] = {}
        self.version = 0  # bumped on every change a snapshot shows
        self.host_version = 0  # bumped when the set of host-resident keys changes

    def set_wanted(self, wanted: Callable[[str], bool]) -> None:
        """Tell the device pool which residents a waiting request wants (they are evicted last)."""
        self.pool.wanted = wanted

    # ---- queries ---------------------------------------------------------------------------------------
    def get(self, key: str) -> HostAdapter | None:
        entry = self._host.get(key)
        return None if entry is None else entry.adapter

    def has(self, key: str) -> bool:
        return key in self._host

    def users(self, key: str) -> int:
        return self._users.get(key, 0)

    def host_bytes(self) -> int:
        return sum(e.nbytes for e in self._host.values())

    def keys(self) -> frozenset[str]:
        return frozenset(self._host)

    def view(self, key: str) -> ResidentView | None:
        """The current view of one host-resident adapter (None if absent)."""
        return next((v for v in self.snapshot([key]) if v.key == key), None)

    def snapshot(self, keys: list[str] | None = None) -> tuple[ResidentView, ...]:
        device = {r.key: r for r in self.pool.residents()}
        views = []
        for key in self._host if keys is None else [k for k in keys if k in self._host]:
            entry = self._host[key]
            resident = device.get(key)
            views.append(
                ResidentView(
                    key=key,
                    info=entry.info,
                    nbytes=entry.nbytes,
                    slot=None if resident is None else resident.slot,
                    device_bytes=0 if resident is None else resident.nbytes,
                    refcount=0 if resident is None else resident.refcount,
                    users=self._users.get(key, 0),
                    pinned=entry.pinned,
                    last_used=entry.last_used,
                )
            )
        return tuple(views)

    # ---- host tier -------------------------------------------------------------------------------------
    def add(self, key: str, adapter: HostAdapter, info: AdapterInfo | None = None) -> list[str]:
        """Hold ``adapter`` under ``key`` (replacing nothing if present); returns the keys evicted to fit it."""
        entry = self._host.get(key)
        if entry is not None:
            entry.last_used = self._clock()
            return []
        self.pool.check_compatible(adapter)
        victims = self._host_victims(adapter.nbytes)
        for victim in victims:
            self._drop(victim)
        self.pool.stage(key, adapter)  # a load failure raises here, before anything below changed
        self._host[key] = _HostEntry(adapter, info or AdapterInfo(rank=adapter.rank), adapter.nbytes, self._clock())
        self.version += 1
        self.host_version += 1
        return victims

    def _host_victims(self, needed: int) -> list[str]:
        """LRU host entries nobody uses or pinned, whose removal makes ``needed`` bytes fit; raises if none can."""
        used = self.host_bytes()
        victims: list[str] = []
        for key, entry in sorted(self._host.items(), key=lambda item: item[1].last_used):
            if used + needed <= self.host_budget:
                break
            if entry.pinned or self._users.get(key, 0) or self.pool.refcount(key):
                continue
            victims.append(key)
            used -= entry.nbytes
        if used + needed > self.host_budget:
            raise ResourceExhausted(
                f"host adapter cache is full ({used} of {self.host_budget} bytes held by pinned or busy adapters)",
                reason="HOST_CACHE_FULL",
            )
        return victims

    def pin(self, key: str, pinned: bool) -> None:
        entry = self._host.get(key)
        if entry is None:
            raise FailedPrecondition(f"adapter {key} is not resident; prefetch it first", reason="NOT_RESIDENT")
        entry.pinned = pinned
        self.version += 1

    def remove(self, key: str) -> bool:
        """Drop ``key`` from every tier; False if absent; ``FailedPrecondition`` while live requests use it."""
        if key not in self._host:
            return False
        users = self._users.get(key, 0)
        if users or self.pool.refcount(key):
            raise FailedPrecondition(f"adapter {key} is in use by {users} request(s)", reason="ADAPTER_IN_USE")
        self._drop(key)
        return True

    def discard(self, key: str) -> None:
        """Drop a broken adapter whatever its users (their requests are being failed by the caller)."""
        if key in self._host:
            self._drop(key)

    def _drop(self, key: str) -> None:
        del self._host[key]
        if self.pool.refcount(key) == 0:
            self.pool.evict(key)
        self.version += 1
        self.host_version += 1

    # ---- live requests ---------------------------------------------------------------------------------
    def add_user(self, key: str) -> None:
        self._users[key] = self._users.get(key, 0) + 1
        self.version += 1

    def drop_user(self, key: str) -> None:
        left = self._users.get(key, 0) - 1
        if left > 0:
            self._users[key] = left
        else:
            self._users.pop(key, None)
        self.version += 1

    # ---- device pool -----------------------------------------------------------------------------------
    def can_acquire(self, key: str) -> bool:
        adapter = self.get(key)
        return adapter is not None and self.pool.can_acquire(key, adapter)

    def stage(self, key: str) -> bool:
        """Copy a host-resident adapter into free device rows ahead of its admission (never evicting)."""
        entry = self._host.get(key)
        if entry is None:
            return False
        staged = self.pool.stage(key, entry.adapter)
        self.version += 1
        return staged

    def acquire(self, key: str) -> int:
        """A device slot for a running sequence (loading and evicting as needed); typed errors on failure."""
        entry = self._host.get(key)
        if entry is None:
            raise FailedPrecondition(f"adapter {key} is not host-resident", reason="NOT_RESIDENT")
        entry.last_used = self._clock()
        self.version += 1
        return self.pool.acquire(key, entry.adapter)

    def release(self, key: str) -> None:
        self.pool.release(key)
        self.version += 1
