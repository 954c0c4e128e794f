"""``AdapterResidency`` without a server: host budget and LRU order, pins, users, device staging, failure paths.

The adapters are real PEFT files of the tiny Llama; the pool is a real ``AdapterPool`` on the CPU.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from loraplex.engine.adapters.host import HostAdapter
from loraplex.engine.adapters.pool import AdapterPool
from loraplex.engine.adapters.residency import AdapterInfo, AdapterResidency
from loraplex.engine.scheduler import Failure
from loraplex.registry.errors import AdapterIncompatible, FailedPrecondition, ResourceExhausted
from loraplex.registry.spec import ModelSpec
from tests.engine.helpers import make_core, prompts, request

ARCH = "llama"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def spec(tiny_models: dict[str, Path]) -> ModelSpec:
    import json

    return ModelSpec.from_config(json.loads((tiny_models[ARCH] / "config.json").read_text()))


@pytest.fixture
def parsed(spec: ModelSpec, tiny_adapters: dict[str, dict[str, Path]]) -> dict[str, HostAdapter]:
    return {name: HostAdapter.from_peft_dir(path, spec, 64) for name, path in tiny_adapters[ARCH].items()}


def _residency(spec: ModelSpec, budget: int, *, slots: int = 4, rows: int = 128) -> AdapterResidency:
    pool = AdapterPool(spec, num_slots=slots, rows=rows, max_rank=64, device=torch.device("cpu"), dtype=torch.float32)
    return AdapterResidency(pool, budget, clock=FakeClock())


def test_host_budget_evicts_least_recently_used_idle_entries(spec: ModelSpec, parsed: dict[str, HostAdapter]) -> None:
    small = ["qv-r4", "o-down-r12", "pattern-r8"]
    budget = sum(parsed[n].nbytes for n in small)
    res = _residency(spec, budget)
    for name in small:
        assert res.add(name, parsed[name], AdapterInfo(f"acme/{name}", 1, parsed[name].rank)) == []
    res.acquire("qv-r4")  # touch: qv-r4 is now the most recently used
    res.release("qv-r4")
    evicted = res.add("attn-r16-rs", parsed["attn-r16-rs"]) if parsed["attn-r16-rs"].nbytes <= budget else []
    assert evicted and evicted[0] == "o-down-r12", "the least recently used idle entry goes first"
    assert res.host_bytes() <= budget
    assert not res.has("o-down-r12") and all(v.key != "o-down-r12" for v in res.snapshot())
    assert "o-down-r12" not in {r.key for r in res.pool.residents()}, "host eviction also leaves the device"


def test_pinned_and_used_entries_stay_and_a_full_cache_changes_nothing(
    spec: ModelSpec, parsed: dict[str, HostAdapter]
) -> None:
    res = _residency(spec, parsed["qv-r4"].nbytes + max(parsed["o-down-r12"].nbytes, parsed["pattern-r8"].nbytes))
    res.add("qv-r4", parsed["qv-r4"])
    res.add("o-down-r12", parsed["o-down-r12"])
    res.pin("qv-r4", True)
    res.add_user("o-down-r12")
    before = (res.keys(), res.host_bytes(), res.version)
    with pytest.raises(ResourceExhausted) as info:
        res.add("pattern-r8", parsed["pattern-r8"])  # only the pinned and the used entries are left to evict
    assert info.value.reason == "HOST_CACHE_FULL"
    assert (res.keys(), res.host_bytes(), res.version) == before
    res.drop_user("o-down-r12")
    assert res.add("pattern-r8", parsed["pattern-r8"]) == ["o-down-r12"]  # the pinned one stays
    with pytest.raises(FailedPrecondition, match="not resident"):
        res.pin("o-down-r12", True)


def test_remove_refused_while_in_use(spec: ModelSpec, parsed: dict[str, HostAdapter]) -> None:
    res = _residency(spec, 1 << 30)
    res.add("all-r8", parsed["all-r8"])
    res.add_user("all-r8")
    with pytest.raises(FailedPrecondition, match="in use"):
        res.remove("all-r8")
    slot = res.acquire("all-r8")
    res.drop_user("all-r8")
    with pytest.raises(FailedPrecondition, match="in use"):
        res.remove("all-r8")  # a running sequence still holds its device slot
    res.release("all-r8")
    assert res.remove("all-r8") and not res.remove("all-r8")
    assert slot not in {r.slot for r in res.pool.residents()}


def test_staging_uses_only_free_rows(spec: ModelSpec, parsed: dict[str, HostAdapter]) -> None:
    res = _residency(spec, 1 << 30, slots=2, rows=64)
    res.add("all-r64", parsed["all-r64"])  # fills every row of the all-linear buffers
    res.add("qv-r4", parsed["qv-r4"])  # no free q/v rows: not staged, nothing displaced
    on_device = {r.key for r in res.pool.residents()}
    assert on_device == {"all-r64"}
    views = {v.key: v for v in res.snapshot()}
    assert views["all-r64"].slot is not None and views["qv-r4"].slot is None
    res.acquire("qv-r4")  # admission may evict the idle resident
    assert {r.key for r in res.pool.residents()} == {"qv-r4"}


def test_a_failed_device_load_gives_back_everything(spec: ModelSpec, parsed: dict[str, HostAdapter]) -> None:
    """A scale float32 cannot hold (alpha 1e308) fails the load after rows were taken: all of them come back."""
    res = _residency(spec, 1 << 30, slots=2, rows=64)
    good = parsed["qv-r4"]
    modules = dict(parsed["all-r8"].modules)
    last = sorted(modules, key=lambda k: (k[0] is None, k))[-1]  # a late module: earlier ones were copied already
    modules[last] = dataclasses.replace(modules[last], scale=1e308)
    poisoned = HostAdapter(modules=modules, rank=8)
    free_before = {mk: len(a.free) for mk, a in res.pool._alloc.items()}
    with pytest.raises(AdapterIncompatible) as info:
        res.pool.acquire("poisoned", poisoned)
    assert info.value.reason == "ADAPTER_LOAD_FAILED"
    assert {mk: len(a.free) for mk, a in res.pool._alloc.items()} == free_before
    assert res.pool.residents() == [] and len(res.pool._free_slots) == 2
    for w in res.pool.weights.values():
        assert not w.a_rows.any() and not w.b_rows.any() and not w.ranks.any() and not w.row_table.any()
    res.add("qv-r4", good)
    assert res.acquire("qv-r4") in (0, 1)


def _poisoned(adapter: HostAdapter) -> HostAdapter:
    """The same adapter with a scale float32 cannot hold (what lora_alpha = 1e308 gives)."""
    return HostAdapter({k: dataclasses.replace(m, scale=1e308) for k, m in adapter.modules.items()}, adapter.rank)


def test_poisoned_adapter_fails_its_requests_and_others_keep_serving(
    tiny_models: dict[str, Path], tiny_adapters: dict[str, dict[str, Path]]
) -> None:
    """Issue 9 item 1: one adapter that cannot be loaded never wedges the engine or leaks a slot."""
    zoo = tiny_adapters[ARCH]
    core = make_core(tiny_models[ARCH], {"good": zoo["qv-r4"], "other": zoo["o-down-r12"]}, max_adapters_per_step=2)
    assert len(core.pool.residents()) == 2  # both staged: no free slot, so "bad" is not staged when added
    bad = _poisoned(HostAdapter.from_peft_dir(zoo["all-r8"], core.loaded.spec, 64))
    core.residency.add("bad", bad)
    reqs = [request(f"b{i}", prompts(1, 5, seed=i)[0], "bad", max_new_tokens=3) for i in range(3)]
    reqs += [
        request(f"g{i}", prompts(1, 5, seed=10 + i)[0], "good", max_new_tokens=3, ignore_eos=True) for i in range(3)
    ]
    for r in reqs:
        core.add_request(r)
    failures: dict[str, BaseException] = {}
    done: list[str] = []
    for _ in range(50):
        for event in core.step():
            if isinstance(event, Failure):
                failures[event.request_id] = event.error
            elif event.finish_reason is not None:
                done.append(event.request_id)
        if not core.has_work():
            break
    assert set(failures) == {"b0", "b1", "b2"} and sorted(done) == ["g0", "g1", "g2"]
    assert all(isinstance(e, AdapterIncompatible) for e in failures.values())
    assert not core.residency.has("bad"), "a broken adapter is dropped, never retried in a loop"
    assert not core.has_work() and core.residency.users("bad") == 0
    assert "bad" not in {r.key for r in core.pool.residents()}
    stats = core.stats()
    assert stats.kv_blocks_free == stats.kv_blocks_total


def test_poisoned_adapter_is_refused_when_staged(
    tiny_models: dict[str, Path], tiny_adapters: dict[str, dict[str, Path]]
) -> None:
    core = make_core(tiny_models[ARCH], {})
    bad = _poisoned(HostAdapter.from_peft_dir(tiny_adapters[ARCH]["all-r8"], core.loaded.spec, 64))
    with pytest.raises(AdapterIncompatible):
        core.residency.add("bad", bad)
    assert not core.residency.has("bad") and core.pool.residents() == []
    assert len(core.pool._free_slots) == core.pool.num_slots


def test_waiting_requests_adapters_are_staged_ahead(
    tiny_models: dict[str, Path], tiny_adapters: dict[str, dict[str, Path]]
) -> None:
    """With the batch full (max_num_seqs), the next waiting request's adapter is copied to free device rows."""
    zoo = tiny_adapters[ARCH]
    core = make_core(tiny_models[ARCH], {"first": zoo["qv-r4"]}, max_adapters_per_step=1, max_num_seqs=1)
    core.residency.add("next", HostAdapter.from_peft_dir(zoo["mlp-r32"], core.loaded.spec, 64))
    assert [r.key for r in core.pool.residents()] == ["first"]  # no free slot when "next" arrived
    assert core.residency.remove("first")  # the slot frees up
    core.add_request(request("busy", [5, 6, 7], None, max_new_tokens=20, ignore_eos=True))
    core.step()  # "busy" takes the only batch place
    core.add_request(request("queued", [5, 6], "next", max_new_tokens=2))
    core.step()
    assert core.scheduler.waiting and [r.key for r in core.pool.residents()] == ["next"]
    assert core.pool.refcount("next") == 0, "staged, not yet referenced"
