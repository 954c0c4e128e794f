"""Continuous batching: the same requests give the same tokens however they are batched, preempted or alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplex.engine.request import FinishReason, GenerationRequest
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
