"""Prompt logprobs (what lm-eval's loglikelihood tasks read through the OpenAI API's echo + logprobs).

Every prompt token's logprob given the tokens before it must equal log_softmax of the transformers + PEFT logits,
whatever the prefill chunking, with adapters and base rows mixed, and a recompute after preemption must not
report any token twice. ``max_new_tokens=0`` scores the prompt without generating.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraplex.engine.request import FinishReason
from loraplex.registry.errors import InvalidArgument
from tests.engine.helpers import BASE, drive, make_core, peft_model, prompts, request, tokens


def _oracle_logprobs(
    model_dir: Path, adapters: dict[str, Path], batch: list[list[int]], names: list[str]
) -> torch.Tensor:
    oracle = peft_model(model_dir, adapters)
    with torch.no_grad():
        logits = oracle(torch.tensor(batch), adapter_names=names).logits.float()
    return torch.log_softmax(logits, dim=-1)  # [B, L, V]


@pytest.mark.parametrize("chunk", [1024, 5])
def test_prompt_logprobs_match_peft(
    chunk: int, tiny_models: dict[str, Path], tiny_adapters: dict[str, dict[str, Path]]
) -> None:
    model_dir = tiny_models["llama"]
    adapters = {name: tiny_adapters["llama"][name] for name in ("qv-r4", "all-r8", "embed-head-r8")}
    names = [*adapters, BASE]
    batch = prompts(len(names), 12, seed=5)
    want = _oracle_logprobs(model_dir, adapters, batch, names)

    core = make_core(model_dir, adapters, max_num_batched_tokens=chunk)
    reqs = [
        request(f"r{i}", p, n, max_new_tokens=0 if i % 2 else 3, prompt_logprobs=2)
        for i, (p, n) in enumerate(zip(batch, names, strict=True))
    ]
    deltas, _ = drive(core, reqs)
    for i, prompt in enumerate(batch):
        got = [d for d in deltas[f"r{i}"] if d.prompt_logprobs is not None]
        assert len(got) == 1, "prompt logprobs are delivered exactly once"
        scored = got[0].prompt_logprobs
        assert scored is not None and scored[0] is None and len(scored) == len(prompt)
        expect = [float(want[i, p, prompt[p + 1]]) for p in range(len(prompt) - 1)]
        torch.testing.assert_close(torch.tensor(scored[1:]), torch.tensor(expect), atol=1e-4, rtol=0)
        tops = got[0].prompt_top_logprobs
        assert tops is not None and tops[0] == [] and all(len(t) == 2 for t in tops[1:])
        best = want[i, 0].topk(2)
        assert [t for t, _ in tops[1]] == best.indices.tolist()
        if i % 2:
            assert tokens(deltas[f"r{i}"]) == [] and deltas[f"r{i}"][-1].finish_reason is FinishReason.MAX_TOKENS
        else:
            assert len(tokens(deltas[f"r{i}"])) == 3
    stats = core.stats()
    assert stats.kv_blocks_free == stats.kv_blocks_total


def test_prompt_logprobs_survive_preemption(tiny_models: dict[str, Path]) -> None:
    """With KV for barely two sequences, preemption recomputes prompts; each prompt is still scored once."""
    model_dir = tiny_models["llama"]
    batch = prompts(4, 10, seed=9)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        want = torch.log_softmax(hf(torch.tensor(batch)).logits.float(), dim=-1)
    core = make_core(model_dir, kv_cache_blocks=12, max_num_batched_tokens=6, max_model_len=48)
    reqs = [
        request(f"r{i}", p, BASE, max_new_tokens=12, ignore_eos=True, prompt_logprobs=0) for i, p in enumerate(batch)
    ]
    deltas, _ = drive(core, reqs, max_steps=2000)
    assert core.scheduler.num_preemptions > 0
    for i, prompt in enumerate(batch):
        got = [d.prompt_logprobs for d in deltas[f"r{i}"] if d.prompt_logprobs is not None]
        assert len(got) == 1
        expect = [float(want[i, p, prompt[p + 1]]) for p in range(len(prompt) - 1)]
        torch.testing.assert_close(torch.tensor(got[0][1:]), torch.tensor(expect), atol=1e-4, rtol=0)


def test_zero_new_tokens_needs_prompt_logprobs(tiny_models: dict[str, Path]) -> None:
    core = make_core(tiny_models["llama"])
    with pytest.raises(InvalidArgument, match="max_new_tokens"):
        core.add_request(request("x", [5, 6, 7], BASE, max_new_tokens=0))
    with pytest.raises(InvalidArgument, match="prompt_logprobs"):
        core.add_request(request("y", [5, 6, 7], BASE, max_new_tokens=0, prompt_logprobs=21))
