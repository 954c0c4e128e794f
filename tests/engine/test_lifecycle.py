"""Request and adapter lifecycle on the synchronous core: abort, slot reuse, waiting adapters, limits, stops."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from loraplex.engine.adapters.host import HostAdapter
from loraplex.engine.core import EngineCore
from loraplex.engine.request import Delta, FinishReason
from loraplex.engine.scheduler import Failure
from loraplex.registry.errors import AdapterNotFound, FailedPrecondition, InvalidArgument
from tests.engine.helpers import drive, finish, make_core, prompts, request, tokens

ARCH = "llama"


@pytest.fixture
def model(tiny_models: dict[str, Path]) -> Path:
    return tiny_models[ARCH]


@pytest.fixture
def adapters(tiny_adapters: dict[str, dict[str, Path]]) -> dict[str, Path]:
    return tiny_adapters[ARCH]


def _step_n(core: EngineCore, n: int) -> list[Delta]:
    out: list[Delta] = []
    for _ in range(n):
        out.extend(e for e in core.step() if isinstance(e, Delta))
    return out


def test_abort_mid_generation_frees_blocks_and_adapter(model: Path, adapters: dict[str, Path]) -> None:
    core = make_core(model, adapters)
    total = core.stats().kv_blocks_total
    core.add_request(request("a", prompts(1, 9)[0], "all-r64", max_new_tokens=50, ignore_eos=True))
    core.add_request(request("b", prompts(1, 5, seed=1)[0], "qv-r4", max_new_tokens=50, ignore_eos=True))
    _step_n(core, 3)
    mid = core.stats()
    assert mid.kv_blocks_free < total
    assert {r.key: r.refcount for r in mid.resident_adapters if r.refcount} == {"all-r64": 1, "qv-r4": 1}

    events = core.abort("a") + core.abort("a")  # idempotent
    assert len(events) == 1 and isinstance(events[0], Delta)
    assert events[0].finish_reason is FinishReason.CANCELLED
    assert events[0].usage.completion_tokens == 3
    events = core.abort("b")
    after = core.stats()
    assert after.kv_blocks_free == total
    assert all(r.refcount == 0 for r in after.resident_adapters)
    assert after.num_running == after.num_waiting == 0
    assert core.residency.users("all-r64") == 0
    assert not core.has_work()


def test_slot_reuse_leaks_nothing(model: Path, adapters: dict[str, Path]) -> None:
    """X (rank 64, all modules) in the only slot, evicted, then Y (rank 4, q/v only) reuses it: equals Y alone."""
    prompt = prompts(1, 6, seed=3)[0]
    fresh = make_core(model, {"Y": adapters["qv-r4"]}, max_adapters_per_step=1)
    want, _ = drive(fresh, [request("y", prompt, "Y", max_new_tokens=8, ignore_eos=True)], record_logits=True)

    core = make_core(model, {"X": adapters["all-r64"], "Y": adapters["qv-r4"]}, max_adapters_per_step=1)
    drive(core, [request("x", prompt, "X", max_new_tokens=4, ignore_eos=True)])
    assert [(r.key, r.slot) for r in core.stats().resident_adapters] == [("X", 0)]
    got, _ = drive(core, [request("y", prompt, "Y", max_new_tokens=8, ignore_eos=True)])
    assert [(r.key, r.slot, r.rank) for r in core.stats().resident_adapters] == [("Y", 0, 4)]
    assert tokens(got["y"]) == tokens(want["y"])
    # Nothing of X remains: modules Y does not target have rank 0 and only Y's rows are non-zero.
    for (layer, module), w in core.pool.weights.items():
        rank = int(w.ranks[0])
        assert rank == (4 if module in ("q_proj", "v_proj") else 0), (layer, module)
        live = set(w.row_table[0, :rank].tolist())
        nonzero = set(torch.nonzero(w.a_rows.abs().sum(1)).flatten().tolist())
        assert nonzero == live


def test_rank_exact_rows_and_lru_eviction(model: Path, adapters: dict[str, Path]) -> None:
    """Rows follow each adapter's own rank; when rows run out the least recently used idle adapter goes."""
    core = make_core(model, adapters, gpu_adapter_rows=64 + 16, max_adapters_per_step=4)
    pool = core.pool
    host = core.residency
    for staged in pool.residents():  # adapters were staged into free rows when added: start from an empty pool
        pool.evict(staged.key)
    for key in ("qv-r4", "all-r8", "pattern-r8"):
        adapter = host.get(key)
        assert adapter is not None
        pool.acquire(key, adapter)
        pool.release(key)
    q_free = len(pool._alloc[(0, "q_proj")].free)
    assert q_free == 80 - 4 - 8 - 4  # pattern-r8 has q_proj at rank 4 (rank_pattern)
    big = host.get("all-r64")
    assert big is not None and pool.can_acquire("all-r64", big)
    pool.acquire("all-r64", big)  # needs 64 rows of q_proj: evicts the LRU residents until it fits
    assert {r.key for r in pool.residents()} >= {"all-r64"}
    assert "qv-r4" not in {r.key for r in pool.residents()}
    # A resident in use is never evicted: with all-r64 pinned there is no room for a second rank-64 adapter.
    assert not pool.can_acquire("other", big)


def test_adapter_not_in_host_tier_does_not_stall_others(model: Path, adapters: dict[str, Path]) -> None:
    core = make_core(model, {})
    core.add_request(request("late", prompts(1, 4)[0], "mlp-r32", max_new_tokens=3, ignore_eos=True))
    core.add_request(request("base", prompts(1, 4, seed=2)[0], None, max_new_tokens=3, ignore_eos=True))
    done = _step_n(core, 4)
    assert [d.request_id for d in done if d.finish_reason] == ["base"]
    assert core.stats().num_waiting == 1
    core.residency.add("mlp-r32", HostAdapter.from_peft_dir(adapters["mlp-r32"], core.loaded.spec, 64))
    done = _step_n(core, 4)
    assert [d.request_id for d in done if d.finish_reason] == ["late"]


def test_fail_adapter_fails_only_its_waiting_requests(model: Path) -> None:
    core = make_core(model, {})
    core.add_request(request("w1", [5, 6], "missing", max_new_tokens=2))
    core.add_request(request("w2", [5, 7], "missing", max_new_tokens=2))
    core.add_request(request("b", [5, 8], None, max_new_tokens=2, ignore_eos=True))
    events = core.fail_adapter("missing", AdapterNotFound("no such adapter"))
    assert sorted(e.request_id for e in events) == ["w1", "w2"]
    assert all(isinstance(e, Failure) and isinstance(e.error, AdapterNotFound) for e in events)
    assert core.residency.users("missing") == 0
    drive(core, [])
    assert core.stats().num_waiting == 0


def test_distinct_adapters_per_step_limit(model: Path, adapters: dict[str, Path]) -> None:
    core = make_core(model, adapters, max_adapters_per_step=2)
    for i, key in enumerate(["qv-r4", "all-r8", "mlp-r32"]):
        core.add_request(request(f"r{i}", [5, 6, 7], key, max_new_tokens=3, ignore_eos=True))
    core.step()
    stats = core.stats()
    assert stats.num_running == 2 and stats.num_waiting == 1
    drive(core, [])
    assert core.stats().num_running == 0


def test_remove_adapter_refused_while_in_use(model: Path, adapters: dict[str, Path]) -> None:
    core = make_core(model, adapters)
    core.add_request(request("r", [5, 6], "qv-r4", max_new_tokens=2, ignore_eos=True))
    with pytest.raises(FailedPrecondition, match="in use"):
        core.residency.remove("qv-r4")
    drive(core, [])
    core.residency.remove("qv-r4")
    assert not core.residency.has("qv-r4")


def test_stop_token_eos_and_stop_string(model: Path) -> None:
    core = make_core(model, {})
    prompt = prompts(1, 5, seed=4)[0]
    ref, _ = drive(core, [request("ref", prompt, None, max_new_tokens=8, ignore_eos=True)])
    ids = tokens(ref["ref"])
    stop_id = ids[2]
    first = ids.index(stop_id)
    got, _ = drive(core, [request("s", prompt, None, max_new_tokens=8, ignore_eos=True, stop_token_ids=(stop_id,))])
    assert tokens(got["s"]) == ids[: first + 1]
    assert finish(got["s"]) is FinishReason.STOP_SEQUENCE

    text = "".join(d.text for d in ref["ref"])
    if len(text.strip()) >= 3:
        stop = text.strip()[1:3]
        got, _ = drive(core, [request("t", prompt, None, max_new_tokens=8, ignore_eos=True, stop=(stop,))])
        assert finish(got["t"]) is FinishReason.STOP_SEQUENCE
        assert "".join(d.text for d in got["t"]) == text[: text.index(stop)]

    got, _ = drive(core, [request("m", prompt, None, max_new_tokens=3, ignore_eos=True)])
    assert finish(got["m"]) is FinishReason.MAX_TOKENS and got["m"][-1].usage.completion_tokens == 3


def test_time_limit(model: Path) -> None:
    core = make_core(model, {})
    core.add_request(
        request("t", [5, 6], None, max_new_tokens=100, ignore_eos=True, time_limit_s=0.5), arrival=time.monotonic() - 1
    )
    events = core.expire()
    assert [e.finish_reason for e in events if isinstance(e, Delta)] == [FinishReason.TIME_LIMIT]
    assert not core.has_work()


def test_seeded_sampling_is_batch_invariant(model: Path, adapters: dict[str, Path]) -> None:
    params = dict(max_new_tokens=8, ignore_eos=True, temperature=0.9, top_p=0.95, seed=1234)
    prompt = prompts(1, 6, seed=9)[0]
    alone, _ = drive(make_core(model, adapters), [request("s", prompt, "all-r8", **params)])
    noise = [
        request(f"n{i}", prompts(1, 3 + i, seed=i)[0], k, max_new_tokens=6, ignore_eos=True, temperature=1.0)
        for i, k in enumerate(["qv-r4", None, "mlp-r32"])
    ]
    mixed, _ = drive(
        make_core(model, adapters, kv_cache_blocks=70, max_model_len=32),
        [request("s", prompt, "all-r8", **params), *noise],
        arrive_at={"n1": 2, "n2": 3},
    )
    assert tokens(mixed["s"]) == tokens(alone["s"])


def test_request_validation(model: Path) -> None:
    core = make_core(model, {}, max_model_len=16)
    with pytest.raises(InvalidArgument, match="empty"):
        core.validate(request("x", [], None))
    with pytest.raises(InvalidArgument, match="prompt_token_ids"):
        core.validate(request("x", [5, 999], None))
    with pytest.raises(InvalidArgument, match="max_model_len"):
        core.validate(request("x", list(range(3, 19)), None))
    # generation is capped by max_model_len
    deltas, _ = drive(core, [request("cap", list(range(3, 13)), None, max_new_tokens=50, ignore_eos=True)])
    assert len(tokens(deltas["cap"])) == 6 and finish(deltas["cap"]) is FinishReason.MAX_TOKENS
