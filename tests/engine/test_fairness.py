"""The admission policy (``FairQueue``) with a fake clock and no model: VTC fairness, weights, priority, aging.

Each simulated step admits what capacity allows, in ``candidates()`` order, charging the tenant the tokens it was
served; the properties are about who gets admitted when.
"""

from __future__ import annotations

from typing import Any, cast

from hypothesis import example, given, settings
from hypothesis import strategies as st

from loraplex.engine.fairness import FairQueue
from loraplex.engine.request import GenerationRequest
from loraplex.engine.sequence import Sequence


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def seq(rid: str, tenant: str, arrival: float, priority: int = 0) -> Sequence:
    request = GenerationRequest(rid, [1, 2, 3], tenant=tenant, priority=priority)
    return Sequence(request=request, arrival=arrival, generator=None, output=cast(Any, None))


def admit(queue: FairQueue, count: int, tokens: int = 10) -> list[str]:
    """Admit up to ``count`` candidates (as a step with that much capacity would), charging each ``tokens``."""
    taken: list[str] = []
    for s in queue.candidates():
        if len(taken) == count:
            break
        queue.remove(s)
        queue.charge(s.request.tenant, tokens)
        taken.append(s.request_id)
    return taken


def test_a_light_tenant_is_not_stuck_behind_a_flood() -> None:
    clock = Clock()
    queue = FairQueue(max_wait_s=1e9, clock=clock)
    for i in range(48):
        queue.push(seq(f"acme{i}", "acme", arrival=0.0))
    admit(queue, 4)  # acme alone is served for a while
    for i in range(6):
        queue.push(seq(f"beta{i}", "beta", arrival=1.0))
    order = admit(queue, 12)
    # beta's counter was lifted to acme's (no banked credit), then the two alternate
    assert [r[:4] for r in order] == ["acme", "beta"] * 6 or [r[:4] for r in order] == ["beta", "acme"] * 6
    assert sorted(r for r in order if r.startswith("beta")) == [f"beta{i}" for i in range(6)]


def test_weights_share_service_in_proportion() -> None:
    queue = FairQueue(weights={"gold": 2.0}, max_wait_s=1e9, clock=Clock())
    for i in range(60):
        queue.push(seq(f"gold{i}", "gold", arrival=float(i)))
        queue.push(seq(f"std{i}", "std", arrival=float(i)))
    order = admit(queue, 30)
    gold = sum(r.startswith("gold") for r in order)
    assert gold == 20, order  # weight 2 vs 1: two thirds of the service


def test_idle_time_is_not_banked() -> None:
    queue = FairQueue(max_wait_s=1e9, clock=Clock())
    for i in range(20):
        queue.push(seq(f"a{i}", "a", arrival=0.0))
    admit(queue, 10)  # a is charged 100 tokens while b is idle
    for i in range(20):
        queue.push(seq(f"b{i}", "b", arrival=1.0))
    order = admit(queue, 10)
    assert 4 <= sum(r.startswith("b") for r in order) <= 6, "b gets a fair share, not everything until it caught up"


def test_priority_goes_first_and_aging_beats_priority() -> None:
    clock = Clock()
    queue = FairQueue(max_wait_s=5.0, clock=clock)
    queue.push(seq("old-low", "t1", arrival=0.0, priority=0))
    queue.push(seq("new-high", "t2", arrival=1.0, priority=5))
    queue.push(seq("new-low", "t3", arrival=1.0, priority=0))
    clock.now = 2.0
    assert admit(queue, 1) == ["new-high"]
    queue.push(seq("newer-high", "t2", arrival=3.0, priority=5))
    clock.now = 5.5  # old-low has waited 5.5 s > 5 s: it goes before any priority (new-low: 4.5 s, not aged)
    assert admit(queue, 2) == ["old-low", "newer-high"]


def test_fcfs_within_a_tenant_and_preempted_go_back_in_front() -> None:
    queue = FairQueue(max_wait_s=1e9, clock=Clock())
    first, second = seq("first", "t", arrival=0.0), seq("second", "t", arrival=1.0)
    queue.push(second)
    queue.push(first)  # a preempted sequence is pushed back with its original arrival
    assert admit(queue, 2) == ["first", "second"]


def test_skipped_candidates_do_not_block_others() -> None:
    queue = FairQueue(max_wait_s=1e9, clock=Clock())
    for rid, tenant in [("x1", "x"), ("x2", "x"), ("y1", "y")]:
        queue.push(seq(rid, tenant, arrival=0.0))
    walked = [s.request_id for s in queue.candidates()]  # nobody admitted: every candidate is offered once
    assert sorted(walked) == ["x1", "x2", "y1"] and walked.index("x1") < walked.index("x2")


def test_aging_does_not_hand_a_flood_the_engine() -> None:
    """Under sustained overload every request of the flooding tenant ages; aged requests must still take turns by
    virtual service, or the flood would take every admission and the light tenant would wait ``max_wait_s``."""
    clock = Clock()
    queue = FairQueue(max_wait_s=3.0, clock=clock)
    arrived: dict[str, float] = {}
    waits: dict[str, float] = {}
    for step in range(60):
        clock.now = float(step)
        for i in range(6):  # heavy offers 6 per step, the engine admits 2
            queue.push(seq(f"heavy{step}-{i}", "heavy", arrival=clock.now))
        queue.push(seq(f"light{step}", "light", arrival=clock.now))
        arrived[f"light{step}"] = clock.now
        for rid in admit(queue, 2):
            if rid in arrived:
                waits[rid] = clock.now - arrived[rid]
    assert len(waits) == 60 and max(waits.values()) == 0.0, waits


# A flood that starves a low-priority request under priority order alone: only aging bounds its wait.
_FLOOD = [(1, "a", 0)] + [(i // 2, "b", 3) for i in range(40)]


@settings(max_examples=60, deadline=None)
@example(arrivals=_FLOOD, capacity=1)
@given(
    arrivals=st.lists(
        st.tuples(st.integers(0, 40), st.sampled_from("abcd"), st.integers(0, 3)), min_size=1, max_size=60
    ),
    capacity=st.integers(1, 3),
)
def test_no_request_starves(arrivals: list[tuple[int, str, int]], capacity: int) -> None:
    """Every request is admitted, and once a request has aged only these may go before it: an older aged request
    of its own tenant, or a request of a tenant with no more virtual service than its own (no higher priority,
    no flood, no later arrival of its own tenant). The flood example: the low-priority request waits at most the
    aging bound (plus the step it ages in)."""
    clock = Clock()
    max_wait = 5.0
    tokens = 10
    queue = FairQueue(max_wait_s=max_wait, clock=clock)
    pending = sorted((t, i, tenant, prio) for i, (t, tenant, prio) in enumerate(arrivals))
    arrived_at: dict[str, float] = {}
    admitted_at: dict[str, float] = {}
    step = 0
    while pending or len(queue):
        clock.now = float(step)
        while pending and pending[0][0] <= step:
            t, i, tenant, prio = pending.pop(0)
            arrived_at[f"r{i}"] = float(t)
            queue.push(seq(f"r{i}", tenant, arrival=float(t), priority=prio))
        taken = 0
        for s in queue.candidates():
            if taken == capacity:
                break
            for r in queue:
                if r is s or not queue.is_aged(r, clock.now):
                    continue
                t_s, t_r = s.request.tenant, r.request.tenant
                if t_s == t_r:
                    assert queue.is_aged(s, clock.now) and s.arrival <= r.arrival, (s.request_id, r.request_id)
                else:
                    assert queue.counter(t_s) <= queue.counter(t_r), (s.request_id, r.request_id)
            queue.remove(s)
            queue.charge(s.request.tenant, tokens)
            admitted_at[s.request_id] = clock.now
            taken += 1
        step += 1
        assert step < 10_000
    assert set(admitted_at) == set(arrived_at)
    if arrivals == _FLOOD:
        assert admitted_at["r0"] - arrived_at["r0"] <= max_wait + 1


def test_an_idle_engine_is_not_banked_either() -> None:
    """A tenant served a lot, then everyone idle: a tenant arriving first afterwards starts level with it."""
    queue = FairQueue(max_wait_s=1e9, clock=Clock())
    for i in range(10):
        queue.push(seq(f"old{i}", "old", arrival=0.0))
    admit(queue, 10)  # "old" got 100 tokens, then left: the engine is idle
    for i in range(10):
        queue.push(seq(f"new{i}", "new", arrival=1.0))  # "new" never got service, but the engine was idle
    for i in range(10):
        queue.push(seq(f"back{i}", "old", arrival=1.5))
    order = admit(queue, 10)
    assert 4 <= sum(r.startswith("new") for r in order) <= 6, order
