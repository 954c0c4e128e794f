"""Continuous batching: the same requests give the same tokens however they are batched, preempted or alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplex.engine.core import EngineCore
from loraplex.engine.request import Delta, FinishReason, GenerationRequest
from loraplex.engine.sampling import SamplingParams
from tests.engine.helpers import BASE, drive, finish, make_core, prompts, request, tokens

ARCH = "llama"
Workload = list[tuple[str, list[int], str]]


@pytest.fixture
def workload(tiny_adapters: dict[str, dict[str, Path]]) -> Workload:
    """10 requests of varied prompt lengths over all 8 adapters and the base model."""
    names = [*tiny_adapters[ARCH], BASE, BASE]
    lengths = [3, 9, 5, 14, 6, 2, 11, 7, 4, 8]
    return [
        (f"r{i}", prompts(1, n, seed=100 + i)[0], name) for i, (name, n) in enumerate(zip(names, lengths, strict=True))
    ]


def _reqs(workload: Workload, new_tokens: int = 8) -> list[GenerationRequest]:
    return [request(rid, p, name, max_new_tokens=new_tokens, ignore_eos=True) for rid, p, name in workload]


def _alone(model: Path, adapters: dict[str, Path], workload: Workload) -> dict[str, list[int]]:
    out = {}
    core = make_core(model, adapters)
    for req in _reqs(workload):
        deltas, _ = drive(core, [req])
        out[req.request_id] = tokens(deltas[req.request_id])
    return out


def test_staggered_pressure_and_alone_agree(
    tiny_models: dict[str, Path], tiny_adapters: dict[str, dict[str, Path]], workload: Workload
) -> None:
    model, adapters = tiny_models[ARCH], tiny_adapters[ARCH]
    alone = _alone(model, adapters, workload)

    together, _ = drive(make_core(model, adapters), _reqs(workload))
    staggered, _ = drive(make_core(model, adapters), _reqs(workload), arrive_at={f"r{i}": i * 2 for i in range(10)})
    # 12 blocks of 4 tokens cannot hold 10 sequences of up to 22 tokens: the newest get preempted and recomputed;
    # a small token budget also forces chunked prefill.
    tight = make_core(model, adapters, kv_cache_blocks=12, max_num_batched_tokens=10, max_model_len=48)
    pressured, _ = drive(tight, _reqs(workload), arrive_at={f"r{i}": i for i in range(10)})
    assert tight.stats().num_preemptions > 0

    for rid, want in alone.items():
        assert len(want) == 8
        assert tokens(together[rid]) == want, rid
        assert tokens(staggered[rid]) == want, rid
        assert tokens(pressured[rid]) == want, rid
        assert finish(pressured[rid]) is FinishReason.MAX_TOKENS
    stats = tight.stats()
    assert stats.kv_blocks_free == stats.kv_blocks_total
    assert stats.num_running == stats.num_waiting == 0


def _tenant_request(rid: str, prompt: list[int], tenant: str, new_tokens: int, priority: int = 0) -> GenerationRequest:
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    return GenerationRequest(rid, prompt, params, tenant=tenant, priority=priority)


def _step(core: EngineCore, deltas: dict[str, list[Delta]]) -> None:
    for event in core.step():
        assert isinstance(event, Delta)
        deltas.setdefault(event.request_id, []).append(event)


def _step_until_running(core: EngineCore, count: int, deltas: dict[str, list[Delta]]) -> None:
    for _ in range(20):
        if len(core.scheduler.running) == count:
            return
        _step(core, deltas)
    raise AssertionError("the batch never filled")


def test_an_under_served_tenant_takes_a_place_from_a_flood_at_once(tiny_models: dict[str, Path]) -> None:
    """Every place held by acme's flood: beta's request is admitted on the next step (one acme sequence is
    preempted and recomputed later), and every output equals the same request served alone."""
    model = tiny_models[ARCH]
    ps = prompts(7, 6, seed=7)
    flood = [_tenant_request(f"acme{i}", ps[i], "acme", 12) for i in range(6)]
    beta = _tenant_request("beta", ps[6], "beta", 12)
    alone = {r.request_id: tokens(drive(make_core(model), [r])[0][r.request_id]) for r in [*flood, beta]}

    core = make_core(model, max_num_seqs=4)
    deltas: dict[str, list[Delta]] = {}
    for r in flood:
        core.add_request(r)
    _step_until_running(core, 4, deltas)
    core.add_request(beta)
    _step(core, deltas)
    assert "beta" in {s.request_id for s in core.scheduler.running}
    assert core.stats().num_preemptions == 1
    rest, _ = drive(core, [])
    for rid, want in alone.items():
        got = [*deltas.get(rid, []), *rest.get(rid, [])]
        assert tokens(got) == want, rid


def test_tenants_at_their_fair_share_do_not_trade_places(tiny_models: dict[str, Path]) -> None:
    ps = prompts(8, 5, seed=9)
    core = make_core(tiny_models[ARCH], max_num_seqs=4)
    reqs = [_tenant_request(f"{t}{i}", ps[4 * k + i], t, 10) for k, t in enumerate("ab") for i in range(4)]
    drive(core, reqs)
    assert core.stats().num_preemptions == 0


def test_a_higher_priority_request_takes_a_place_at_once(tiny_models: dict[str, Path]) -> None:
    ps = prompts(5, 5, seed=11)
    core = make_core(tiny_models[ARCH], max_num_seqs=4)
    for i in range(4):
        core.add_request(_tenant_request(f"low{i}", ps[i], "t", 20))
    _step_until_running(core, 4, {})
    core.add_request(_tenant_request("urgent", ps[4], "t", 4, priority=5))
    _step(core, {})
    assert "urgent" in {s.request_id for s in core.scheduler.running}
    assert core.stats().num_preemptions == 1
    drive(core, [])


def test_recompute_after_preemption_is_not_charged_to_the_tenant(tiny_models: dict[str, Path]) -> None:
    """The fair-share counter counts each position once: what the tenant asked for, not what preemption redid."""
    ps = prompts(6, 9, seed=13)
    reqs = [_tenant_request(f"r{i}", p, "t", 8) for i, p in enumerate(ps)]
    tight = make_core(tiny_models[ARCH], kv_cache_blocks=12, max_num_batched_tokens=10, max_model_len=48)
    drive(tight, reqs, arrive_at={f"r{i}": i for i in range(6)})
    assert tight.stats().num_preemptions > 0
    asked = sum(len(p) + 8 - 1 for p in ps)  # every prompt position and every generated token but the last
    assert tight.scheduler.waiting.counter("t") == asked
