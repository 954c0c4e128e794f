"""DoRA adapters in mixed batches, against PEFT (issue 12 part 1).

One engine batch mixes DoRA adapters (q/k/v with bias on Qwen2, o, MLP), a plain LoRA adapter and base rows. PEFT
cannot run DoRA in a mixed batch (``adapter_names`` refuses it), so the oracle runs each row with its adapter set;
greedy tokens must be equal and fp32 logits within 1e-4 at the prefill and every decode step. The test models
have non-zero biases, so a bias inside DoRA's scaling would fail here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraplex.services.demo_assets import ALL_LINEAR, AdapterSpec, build_adapter
from tests.engine.helpers import BASE, drive, make_core, peft_model, per_row_oracle, prompts, request, tokens
from tests.fixtures.hf import ARCHITECTURES
from tests.fixtures.peft_variants import build_dora_adapter, build_model_with_biases

NEW_TOKENS = 6
PROMPT_LEN = 7
EOS = 1

SPECS = {
    "dora-all-r8": AdapterSpec(r=8, lora_alpha=16, target_modules=tuple(ALL_LINEAR), seed=21),
    "dora-qkv-r4": AdapterSpec(r=4, lora_alpha=8, target_modules=("q_proj", "k_proj", "v_proj"), seed=22),
    "dora-o-mlp-r16-rs": AdapterSpec(
        r=16, lora_alpha=32, target_modules=("o_proj", "gate_proj", "down_proj"), use_rslora=True, seed=23
    ),
}
LORA = AdapterSpec(r=8, lora_alpha=16, target_modules=tuple(ALL_LINEAR), seed=24)


@pytest.fixture(scope="module", params=ARCHITECTURES)
def dora_zoo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    arch = str(request.param)
    root = tmp_path_factory.mktemp(f"dora-{arch}")
    model = build_model_with_biases(root / "model", arch, seed=5)
    adapters = {
        name: build_dora_adapter(model, root / name, spec, magnitude_seed=i)
        for i, (name, spec) in enumerate(SPECS.items())
    }
    adapters["lora-r8"] = build_adapter(model, root / "lora-r8", LORA)
    return model, adapters


def test_dora_in_a_mixed_batch_matches_peft(dora_zoo: tuple[Path, dict[str, Path]]) -> None:
    model_dir, adapters = dora_zoo
    names = [*adapters, BASE, "dora-all-r8"]
    batch = prompts(len(names), PROMPT_LEN, seed=13)
    rows = list(zip(names, batch, strict=True))
    want = per_row_oracle(peft_model(model_dir, adapters), rows, NEW_TOKENS, EOS)

    core = make_core(model_dir, adapters)
    reqs = [request(f"r{i}", p, n, max_new_tokens=NEW_TOKENS) for i, (n, p) in enumerate(rows)]
    deltas, logits = drive(core, reqs, record_logits=True)
    for i, (name, _) in enumerate(rows):
        assert tokens(deltas[f"r{i}"]) == want[i][0], f"row {i} ({name})"
        for k, expected in enumerate(want[i][1]):
            got = logits[k].get(f"r{i}") if k < len(logits) else None
            if got is None:
                break  # finished (EOS) before this step
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=0, msg=f"row {i} ({name}) step {k}")
    stats = core.stats()
    assert stats.kv_blocks_free == stats.kv_blocks_total
    assert core.pool.dora.free_rows == core.pool.dora.capacity - 3, "one factor row per resident DoRA adapter"


def test_dora_capacity_is_bounded_and_evictions_give_rows_back(dora_zoo: tuple[Path, dict[str, Path]]) -> None:
    model_dir, adapters = dora_zoo
    dora = {name: path for name, path in adapters.items() if name.startswith("dora")}
    core = make_core(model_dir, {}, max_dora_adapters=1)
    from loraplex.engine.adapters.host import HostAdapter

    for name, path in dora.items():
        core.residency.add(name, HostAdapter.from_peft_dir(path, core.loaded.spec, 64))
    assert core.pool.dora.free_rows == 0  # the first was staged into the only factor row; the others wait
    reqs = [request(f"d{i}", prompts(1, 5, seed=i)[0], name, max_new_tokens=2) for i, name in enumerate(dora)]
    deltas, _ = drive(core, reqs)
    assert all(len(tokens(deltas[f"d{i}"])) >= 1 for i in range(len(dora)))  # each took the row in turn
    assert core.pool.dora.free_rows == 0 and sum(r >= 0 for r in core.pool.dora.row_of_slot) == 1
