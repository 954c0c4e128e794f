"""A point-in-time view of the engine for health checks, metrics and tests."""

from __future__ import annotations

from dataclasses import dataclass

from loraplex.engine.adapters.pool import ResidentInfo


@dataclass(frozen=True)
class EngineStats:
    kv_blocks_free: int
    kv_blocks_total: int
    num_running: int
    num_waiting: int
    resident_adapters: tuple[ResidentInfo, ...]  # in the device pool: slot, rank, bytes, refcount
    pool_slots: int
    pool_rows: int
    host_adapters: dict[str, int]  # host tier: key -> bytes
    num_preemptions: int = 0  # sequences preempted (recomputed) since start
