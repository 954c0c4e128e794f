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


# A flood that starves a low-priority request under priority (or VTC) order alone: only aging bounds its wait.
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
    """Whatever the priorities and tenants, a request waits at most the aging bound plus the requests that were
    already waiting when it arrived (served first-come once aged), and every request is eventually admitted."""
    clock = Clock()
    max_wait = 5.0
    queue = FairQueue(max_wait_s=max_wait, clock=clock)
    pending = sorted((t, i, tenant, prio) for i, (t, tenant, prio) in enumerate(arrivals))
    waiting_at_arrival: dict[str, int] = {}
    arrived_at: dict[str, float] = {}
    admitted_at: dict[str, float] = {}
    step = 0
    while pending or len(queue):
        clock.now = float(step)
        while pending and pending[0][0] <= step:
            t, i, tenant, prio = pending.pop(0)
            rid = f"r{i}"
            waiting_at_arrival[rid] = len(queue)
            arrived_at[rid] = float(t)
            queue.push(seq(rid, tenant, arrival=float(t), priority=prio))
        for rid in admit(queue, capacity):
            admitted_at[rid] = clock.now
        step += 1
        assert step < 10_000
    assert set(admitted_at) == set(arrived_at)
    for rid, start in arrived_at.items():
        bound = max_wait + waiting_at_arrival[rid] / capacity + 1
        assert admitted_at[rid] - start <= bound, (rid, admitted_at[rid] - start, bound)


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
