"""Equivalence with transformers + PEFT: one mixed batch of all zoo adapters plus base rows, per architecture.

Greedy tokens must equal ``PeftModel.generate(adapter_names=...)`` row by row and fp32 logits (prefill last
token and every decode step) must be within 1e-4 of PEFT's.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine.helpers import BASE, assert_mixed_batch_matches, make_core, peft_model, prompts
from tests.fixtures.hf import ARCHITECTURES

NEW_TOKENS = 8
PROMPT_LEN = 7
EOS = 1


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_mixed_batch_matches_peft(
    arch: str, tiny_models: dict[str, Path], tiny_adapters: dict[str, dict[str, Path]]
) -> None:
    adapters = tiny_adapters[arch]
    names = [*adapters, BASE, BASE]  # all 8 adapters and two base-model rows in ONE batch
    batch = prompts(len(names), PROMPT_LEN, seed=11)

    core = make_core(tiny_models[arch], adapters)
    assert_mixed_batch_matches(core, peft_model(tiny_models[arch], adapters), batch, names, NEW_TOKENS, EOS, 3)
    stats = core.stats()
    assert stats.kv_blocks_free == stats.kv_blocks_total
    assert all(r.refcount == 0 for r in stats.resident_adapters)
    assert len(stats.resident_adapters) == len(adapters)
