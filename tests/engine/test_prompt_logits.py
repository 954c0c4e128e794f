"""``ModelRunner.run(batch, num_logits)``: logits rows for every prompt token (echo + logprobs) equal PEFT's.

Why: prompt logprobs need a logits row per prompt token, grouped by row for lm_head LoRA; the rows of a mixed
batch (all tokens of one sequence, the last token of another, none of a third) must come back in slice order.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.engine.helpers import BASE, make_core, peft_model, prompts, request

PROMPT_LEN = 6


def test_every_prompt_token_row_matches_peft(
    tiny_models: dict[str, Path], tiny_adapters: dict[str, dict[str, Path]]
) -> None:
    adapters = {name: tiny_adapters["llama"][name] for name in ("embed-head-r8", "all-r8")}
    names = ["embed-head-r8", BASE, "all-r8"]
    batch = prompts(len(names), PROMPT_LEN, seed=5)
    core = make_core(tiny_models["llama"], adapters)
    for i, (p, n) in enumerate(zip(batch, names, strict=True)):
        core.add_request(request(f"r{i}", p, n, max_new_tokens=2))
    scheduled = core.scheduler.schedule()
    assert [seq.request_id for seq, _ in scheduled.items] == ["r0", "r1", "r2"]
    rows = core.runner.run(scheduled, num_logits=[PROMPT_LEN, 0, 1])
    assert rows.dtype == torch.float32 and rows.shape[0] == PROMPT_LEN + 1

    oracle = peft_model(tiny_models["llama"], adapters)
    with torch.no_grad():
        want = oracle(torch.tensor(batch), adapter_names=names).logits.float()
    torch.testing.assert_close(rows[:PROMPT_LEN], want[0], atol=1e-4, rtol=0)  # every token of r0
    torch.testing.assert_close(rows[PROMPT_LEN], want[2, -1], atol=1e-4, rtol=0)  # the last token of r2


def test_num_logits_must_match_the_batch(tiny_models: dict[str, Path]) -> None:
    core = make_core(tiny_models["llama"])
    core.add_request(request("r0", [5, 6, 7], None, max_new_tokens=1))
    scheduled = core.scheduler.schedule()
    with pytest.raises(ValueError, match="num_logits"):
        core.runner.run(scheduled, num_logits=[1, 1])
