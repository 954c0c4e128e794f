"""``FairQueue``: the waiting requests, and the order in which admission should try them.

Why its own object: admission order is policy (who goes first when capacity binds), while the scheduler's job is
capacity (blocks, rows, tokens); keeping the policy here lets it be tested with a fake clock and no model.

The order, one step at a time (``candidates``):
  1. Priority: a higher ``priority`` is admitted before any lower one. Aging: a request waiting longer than
     ``max_wait_s`` counts as the highest priority present (and goes first within its tenant, oldest first), so
     a stream of higher-priority work cannot starve it.
  2. Fairness between tenants at equal (effective) priority: the tenant with the least *virtual service* goes
     next (S-LoRA's virtual token counter, VTC): every prompt or output token the engine computes for a tenant
     adds ``1 / weight`` to its counter. A tenant that becomes active again has its counter lifted to the least
     counter among the active tenants — or, when none is active, to the counter of the last tenant that left —
     so neither idle time nor an idle engine is banked as credit.
     Equal counters (a tenant that just became active is lifted to the least one): fewer running requests first.
  3. FCFS within a tenant (at equal priority).
Aging never overrides tenant fairness: under sustained overload a flooding tenant's requests all age, and if aged
requests simply went first the flood would take every admission and starve the light tenant it competes with.
The caller may skip a candidate it cannot place (its adapter is not fetched yet, or no device room) without
blocking the others (an aged one's adapter is then held for it: see ``Scheduler._admit``); ``charge`` during the
walk makes the next pick see the service just granted.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping

from loraplex.engine.sequence import Sequence


class FairQueue:
    def __init__(
        self,
        weights: Mapping[str, float] | None = None,
        max_wait_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._weights = dict(weights or {})
        self.max_wait_s = max_wait_s
        self._clock = clock
        self._by_tenant: dict[str, list[Sequence]] = {}  # each sorted by (-priority, arrival)
        self._counters: dict[str, float] = {}
        self._running: defaultdict[str, int] = defaultdict(int)
        self._waiting_keys: defaultdict[str, int] = defaultdict(int)
        self._size = 0
        self._idle_floor = 0.0  # the counter of the last tenant to become inactive

    # ---- membership ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[Sequence]:
        for queue in self._by_tenant.values():
            yield from queue

    def __contains__(self, seq: object) -> bool:
        return isinstance(seq, Sequence) and seq in self._by_tenant.get(seq.request.tenant, ())

    def push(self, seq: Sequence) -> None:
        """Queue ``seq`` in its tenant's order (a preempted sequence keeps its arrival, so it goes back in front)."""
        tenant = seq.request.tenant
        if not self._active(tenant):
            self._lift(tenant)
        queue = self._by_tenant.setdefault(tenant, [])
        key = (-seq.request.priority, seq.arrival)
        index = len(queue)
        while index > 0 and (-queue[index - 1].request.priority, queue[index - 1].arrival) > key:
            index -= 1
        queue.insert(index, seq)
        self._size += 1
        if seq.adapter_key is not None:
            self._waiting_keys[seq.adapter_key] += 1

    def remove(self, seq: Sequence) -> None:
        tenant = seq.request.tenant
        queue = self._by_tenant[tenant]
        queue.remove(seq)
        if not queue:
            del self._by_tenant[tenant]
            self._maybe_left(tenant)
        self._size -= 1
        if seq.adapter_key is not None:
            left = self._waiting_keys[seq.adapter_key] - 1
            if left:
                self._waiting_keys[seq.adapter_key] = left
            else:
                del self._waiting_keys[seq.adapter_key]

    def wants(self, adapter_key: str) -> bool:
        """Whether some waiting request names ``adapter_key``."""
        return adapter_key in self._waiting_keys

    def waiting_adapters(self) -> frozenset[str]:
        return frozenset(self._waiting_keys)

    # ---- service accounting ----------------------------------------------------------------------------
    def on_running(self, seq: Sequence, running: bool) -> None:
        """Track running sequences per tenant (a tenant with running work is active)."""
        tenant = seq.request.tenant
        self._running[tenant] += 1 if running else -1
        if self._running[tenant] <= 0:
            del self._running[tenant]
            self._maybe_left(tenant)

    def charge(self, tenant: str, tokens: int) -> None:
        """``tokens`` computed for ``tenant``: its virtual service grows by tokens / weight."""
        self._counters[tenant] = self._counters.get(tenant, 0.0) + tokens / self._weight(tenant)

    def counter(self, tenant: str) -> float:
        return self._counters.get(tenant, 0.0)

    def _weight(self, tenant: str) -> float:
        return self._weights.get(tenant, 1.0)

    def _active(self, tenant: str) -> bool:
        return tenant in self._by_tenant or tenant in self._running

    def _maybe_left(self, tenant: str) -> None:
        if not self._active(tenant):
            self._idle_floor = self._counters.get(tenant, 0.0)

    def _lift(self, tenant: str) -> None:
        active = [self._counters.get(t, 0.0) for t in {*self._by_tenant, *self._running} if t != tenant]
        floor = min(active) if active else self._idle_floor
        self._counters[tenant] = max(self._counters.get(tenant, 0.0), floor)

    # ---- admission order -------------------------------------------------------------------------------
    def is_aged(self, seq: Sequence, now: float) -> bool:
        return now - seq.arrival >= self.max_wait_s

    def effective_priority(self, seq: Sequence, now: float) -> int:
        """``seq``'s priority, or the highest waiting priority once it has aged (what ``candidates`` ranks by)."""
        if not self.is_aged(seq, now):
            return seq.request.priority
        top = max((q[0].request.priority for q in self._by_tenant.values() if q), default=seq.request.priority)
        return max(top, seq.request.priority)

    def active_tenants(self) -> set[str]:
        return {*self._by_tenant, *self._running}

    def candidates(self) -> Iterator[Sequence]:
        """Waiting sequences in admission order (see the module docstring); safe to ``remove`` while walking."""
        now = self._clock()
        top = max((q[0].request.priority for q in self._by_tenant.values() if q), default=0)
        aged = {
            tenant: sorted((s for s in queue if self.is_aged(s, now)), key=lambda s: s.arrival)
            for tenant, queue in self._by_tenant.items()
        }
        skip: set[Sequence] = set()
        position = {tenant: [0, 0] for tenant in self._by_tenant}  # [next aged, next in queue order] per tenant
        while True:
            best: tuple[int, float, int, float] | None = None
            pick: Sequence | None = None
            for tenant, cursor in position.items():
                head = self._head(aged.get(tenant, []), cursor, 0, skip) or self._head(
                    self._by_tenant.get(tenant, []), cursor, 1, skip
                )
                if head is None:
                    continue
                priority = top if self.is_aged(head, now) else head.request.priority
                key = (-priority, self.counter(tenant), self._running.get(tenant, 0), head.arrival)
                if best is None or key < best:
                    best, pick = key, head
            if pick is None:
                return
            skip.add(pick)
            yield pick

    @staticmethod
    def _head(queue: list[Sequence], cursor: list[int], which: int, skip: set[Sequence]) -> Sequence | None:
        """The first entry of ``queue`` from ``cursor[which]`` not yet offered (advancing the cursor past those)."""
        index = cursor[which]
        while index < len(queue) and queue[index] in skip:
            index += 1
        cursor[which] = index
        return queue[index] if index < len(queue) else None
