"""A hot adapter merged into the base weights (issue 12 part 3), against PEFT.

Requests of the merged adapter run with no LoRA work and must equal PEFT's ``merge_and_unload`` model; base rows
and every other adapter in the same batch run the merged adapter's negated delta and must equal the unmerged PEFT
oracle (fp32 1e-4); unmerging restores every base weight bit for bit; merging or unmerging while sequences run
changes no output.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraplex.engine.context import MERGED_SLOT
from loraplex.registry.errors import FailedPrecondition
from tests.engine.helpers import BASE, drive, make_core, peft_model, prompts, request, tokens, until_eos

ARCH = "llama"
HOT = "all-r8"
OTHERS = ("qv-r4", "mlp-r32", "embed-head-r8")
NEW_TOKENS = 6
EOS = 1


def _weights(core: object) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in core.loaded.model.named_parameters()}  # type: ignore[attr-defined]


def test_merged_rows_equal_merge_and_unload_and_others_stay_exact(
    tiny_models: dict[str, Path], tiny_adapters: dict[str, dict[str, Path]]
) -> None:
    model_dir, zoo = tiny_models[ARCH], tiny_adapters[ARCH]
    adapters = {name: zoo[name] for name in (HOT, *OTHERS)}
    names = [HOT, *OTHERS, BASE, HOT]
    batch = prompts(len(names), 7, seed=17)

    oracle = peft_model(model_dir, adapters)
    with torch.no_grad():
        unmerged = oracle.generate(
            torch.tensor(batch),
            adapter_names=names,
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            output_logits=True,
            return_dict_in_generate=True,
        )
    merged_model = peft_model(model_dir, {HOT: zoo[HOT]}).merge_and_unload()
    hot_rows = [i for i, n in enumerate(names) if n == HOT]
    with torch.no_grad():
        merged = merged_model.generate(
            torch.tensor([batch[i] for i in hot_rows]),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            output_logits=True,
            return_dict_in_generate=True,
        )

    core = make_core(model_dir, adapters)
    before = _weights(core)
    core.merge_adapter(HOT)
    reqs = [
        request(f"r{i}", p, n, max_new_tokens=NEW_TOKENS) for i, (n, p) in enumerate(zip(names, batch, strict=True))
    ]
    deltas, logits = drive(core, reqs, record_logits=True)
    for i, name in enumerate(names):
        if name == HOT:
            j = hot_rows.index(i)
            want_ids, want_logits = merged.sequences[j, 7:].tolist(), [step[j] for step in merged.logits]
        else:
            want_ids, want_logits = unmerged.sequences[i, 7:].tolist(), [step[i] for step in unmerged.logits]
        assert tokens(deltas[f"r{i}"]) == until_eos(want_ids, EOS), f"row {i} ({name})"
        for k, expected in enumerate(want_logits):
            got = logits[k].get(f"r{i}") if k < len(logits) else None
            if got is None:
                break
            torch.testing.assert_close(got, expected.float(), atol=1e-4, rtol=0, msg=f"row {i} ({name}) step {k}")
    assert core.unmerge_adapter() == HOT
    after = _weights(core)
    assert all(torch.equal(before[name], after[name]) for name in before), "unmerge restores every weight exactly"
    assert core.pool.merged_slot is None and core.unmerge_adapter() is None
    stats = core.stats()
    assert stats.kv_blocks_free == stats.kv_blocks_total


def test_merging_and_unmerging_mid_generation_change_no_output(
    tiny_models: dict[str, Path], tiny_adapters: dict[str, dict[str, Path]]
) -> None:
    model_dir, zoo = tiny_models[ARCH], tiny_adapters[ARCH]
    adapters = {HOT: zoo[HOT], "qv-r4": zoo["qv-r4"]}
    batch = prompts(3, 6, seed=3)
    plan = [(HOT, batch[0]), ("qv-r4", batch[1]), (BASE, batch[2])]
    reqs = [request(f"r{i}", p, n, max_new_tokens=12, ignore_eos=True) for i, (n, p) in enumerate(plan)]
    want, _ = drive(make_core(model_dir, adapters), reqs)

    core = make_core(model_dir, adapters)
    for r in reqs:
        core.add_request(r)
    got: dict[str, list[int]] = {r.request_id: [] for r in reqs}

    def steps(n: int) -> None:
        for _ in range(n):
            for event in core.step():
                got[event.request_id] += event.token_ids  # type: ignore[union-attr]

    steps(3)
    core.merge_adapter(HOT)  # the running HOT sequence keeps its own slot: own delta + negation + merged W
    steps(3)
    core.add_request(request("late", batch[0], HOT, max_new_tokens=12, ignore_eos=True))
    got["late"] = []
    steps(2)
    late = next(s for s in core.scheduler.running if s.request_id == "late")
    assert late.slot == MERGED_SLOT
    core.unmerge_adapter()  # "late" gets a pool slot back
    while core.has_work():
        steps(1)
    for r in reqs:
        assert got[r.request_id] == tokens(want[r.request_id]), r.request_id
    assert got["late"] == tokens(want["r0"])


def test_merge_refusals_change_nothing(tiny_models: dict[str, Path], tiny_adapters: dict[str, dict[str, Path]]) -> None:
    zoo = tiny_adapters[ARCH]
    core = make_core(tiny_models[ARCH], {HOT: zoo[HOT], "qv-r4": zoo["qv-r4"]})
    before = _weights(core)
    with pytest.raises(FailedPrecondition, match="not resident"):
        core.merge_adapter("missing")
    core.merge_adapter(HOT)
    with pytest.raises(FailedPrecondition) as info:
        core.merge_adapter("qv-r4")
    assert info.value.reason == "ALREADY_MERGED"
    core.unmerge_adapter()
    assert all(torch.equal(before[n], p) for n, p in _weights(core).items())
