"""A point-in-time view of the engine for health checks, metrics, listings and tests.

Why immutable: the step thread builds one after every step and the event loop (RPCs, metric scrapes) reads the
latest without any lock, so no reader ever waits for a forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loraplex.engine.adapters.pool import ResidentInfo
from loraplex.engine.adapters.residency import ResidentView


@dataclass(frozen=True)
class EngineStats:
    kv_blocks_free: int
    kv_blocks_total: int
    num_running: int
    num_waiting: int
    resident_adapters: tuple[ResidentInfo, ...]  # in the device pool: slot, rank, bytes, refcount
    pool_slots: int
    pool_rows: int
    block_size: int = 0
    residents: tuple[ResidentView, ...] = ()  # host tier (and where each sits on the device)
    host_bytes: int = 0
    host_budget_bytes: int = 0
    num_preemptions: int = 0  # sequences preempted (recomputed) since start
    running_adapter_names: tuple[str, ...] = ()  # adapters with a running request, as clients named them
    waiting_adapter_names: tuple[str, ...] = ()  # adapters whose requests only wait
    max_adapters_per_step: int = 0
    merged_adapter: str | None = None  # the key of the adapter folded into the base weights
    created: float = field(default=0.0, compare=False)  # time.time() when published

    @property
    def kv_usage(self) -> float:
        """Used KV blocks over all blocks, 0..1 (the router protocol's kv_cache_usage_perc)."""
        return 1.0 - self.kv_blocks_free / self.kv_blocks_total if self.kv_blocks_total else 0.0

    @property
    def host_adapters(self) -> dict[str, int]:
        """key -> host bytes of every host-resident adapter."""
        return {r.key: r.nbytes for r in self.residents}


def empty_stats() -> EngineStats:
    return EngineStats(0, 0, 0, 0, (), 0, 0)
