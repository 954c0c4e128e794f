"""Equivalence with transformers + PEFT: one mixed batch of all zoo adapters plus base rows, per architecture.

Greedy tokens must equal ``PeftModel.generate(adapter_names=...)`` row by row and fp32 logits (prefill last
token and every decode step) must be within 1e-4 of PEFT's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.engine.helpers import BASE, drive, make_core, peft_model, prompts, request, tokens, until_eos
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

    oracle = peft_model(tiny_models[arch], adapters)
    input_ids = torch.tensor(batch)
    with torch.no_grad():
        prefill = oracle(input_ids, adapter_names=names).logits[:, -1].float()
        out = oracle.generate(
            input_ids,
            adapter_names=names,
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            output_logits=True,
            return_dict_in_generate=True,
        )
    want = [until_eos(row[PROMPT_LEN:].tolist(), EOS) for row in out.sequences]

    core = make_core(tiny_models[arch], adapters)
    reqs = [
        request(f"r{i}", p, n, max_new_tokens=NEW_TOKENS) for i, (p, n) in enumerate(zip(batch, names, strict=True))
    ]
    deltas, logits = drive(core, reqs, record_logits=True)

    for i, name in enumerate(names):
        assert tokens(deltas[f"r{i}"]) == want[i], f"{arch} row {i} adapter {name}"
    # Step 0 is the whole batch's prefill; step k > 0 is decode step k (HF's out.logits[k]).
    for i in range(len(names)):
        torch.testing.assert_close(logits[0][f"r{i}"], prefill[i], atol=1e-4, rtol=0)
    compared = 0
    for k in range(1, NEW_TOKENS):
        for i in range(len(names)):
            row = logits[k].get(f"r{i}") if k < len(logits) else None
            if row is None:
                continue  # finished (EOS) before this step
            torch.testing.assert_close(row, out.logits[k][i].float(), atol=1e-4, rtol=0)
            compared += 1
    assert compared >= len(names) * 3
    stats = core.stats()
    assert stats.kv_blocks_free == stats.kv_blocks_total
    assert all(r.refcount == 0 for r in stats.resident_adapters)
    assert len(stats.resident_adapters) == len(adapters)
