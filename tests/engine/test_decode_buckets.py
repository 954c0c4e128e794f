"""Decode steps run in padded batch-size buckets (what CUDA graphs replay) give the same tokens and logits.

Why on CPU: capture needs CUDA, but everything a replay reads — padding sequences on the scratch KV block,
fixed-width block tables, padded LoRA segment tables — is built by the same code; ``DecodeGraphs`` without
``capture`` runs exactly those inputs eagerly. CUDA capture itself is tested in tests/kernels/test_cuda_graphs.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraplex.engine.config import EngineConfig
from loraplex.engine.core import EngineCore
from loraplex.engine.cuda_graphs import DecodeGraphs, buckets
from loraplex.registry.errors import InvalidArgument
from tests.engine.helpers import BASE, drive, make_core, prompts, request, tokens


def padded(core: EngineCore) -> DecodeGraphs:
    runner = core.runner
    runner.graphs = DecodeGraphs(runner.builder, runner._forward, core.config.max_num_seqs, capture=False)
    return runner.graphs


def test_buckets_cover_every_batch_size() -> None:
    assert buckets(1) == [1]
    assert buckets(8) == [1, 2, 4, 8]
    assert buckets(48) == [1, 2, 4, 8, 16, 32, 48]


def run(core: EngineCore, names: list[str]) -> tuple[list[list[int]], list[dict[str, torch.Tensor]]]:
    batch = prompts(len(names), 5, seed=7)
    # Different lengths: sequences finish at different steps, so decode batches shrink through several buckets.
    reqs = [request(f"r{i}", p, n, max_new_tokens=2 + 2 * i) for i, (p, n) in enumerate(zip(batch, names, strict=True))]
    deltas, logits = drive(core, reqs, arrive_at={"r4": 2}, record_logits=True)
    return [tokens(deltas[f"r{i}"]) for i in range(len(names))], logits


def test_padded_decode_buckets_match_eager_steps(
    tiny_models: dict[str, Path], tiny_adapters: dict[str, dict[str, Path]]
) -> None:
    adapters = {name: tiny_adapters["llama"][name] for name in ("embed-head-r8", "pattern-r8", "all-r64")}
    names = [*adapters, BASE, "all-r64"]
    eager_tokens, eager_logits = run(make_core(tiny_models["llama"], adapters, max_num_seqs=6), names)
    core = make_core(tiny_models["llama"], adapters, max_num_seqs=6)
    graphs = padded(core)
    bucket_tokens, bucket_logits = run(core, names)
    assert graphs.replays >= 5, "decode steps should run through the buckets"
    assert bucket_tokens == eager_tokens
    for eager, bucketed in zip(eager_logits, bucket_logits, strict=True):
        assert eager.keys() == bucketed.keys()
        for rid in eager:
            torch.testing.assert_close(bucketed[rid], eager[rid], atol=1e-5, rtol=0)


def test_only_plain_decode_steps_are_eligible(tiny_models: dict[str, Path]) -> None:
    from loraplex.engine.context import SeqSlice

    graphs = padded(make_core(tiny_models["llama"], max_num_seqs=4))
    decode = [SeqSlice([3], 4, [0, 1], -1, 1), SeqSlice([4], 2, [2], 0, 1)]
    assert graphs.bucket(decode) == 2
    assert graphs.bucket([*decode, decode[0]]) == 4
    assert graphs.bucket([SeqSlice([3, 4], 0, [0], -1, 1)]) is None  # a prompt chunk
    assert graphs.bucket([SeqSlice([3], 4, [0, 1], -1, 0)]) is None  # no logits row (mid-prompt)
    assert graphs.bucket([decode[0]] * 5) is None  # more sequences than the largest bucket


def test_config_names_its_backend_and_cpu_never_captures(tiny_models: dict[str, Path]) -> None:
    with pytest.raises(InvalidArgument, match="lora_backend"):
        EngineConfig(model_dir=tiny_models["llama"], lora_backend="cuda").validate()
    core = make_core(tiny_models["llama"], lora_backend="auto", enforce_eager=False)
    assert core.runner.lora.name == "torch" and core.runner.graphs is None  # graphs need CUDA + Triton
