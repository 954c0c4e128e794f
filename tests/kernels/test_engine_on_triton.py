"""The engine driven through the Triton path end to end (LoRA shrink/expand/embedding, paged prefill and decode
attention), against the torch path.

On CPU this runs the real kernels in Triton's interpreter (see conftest), so it is kept tiny and in one test:
prompt-token logits rows (``num_logits``) and the greedy tokens of a mixed batch must agree between the two
backends, decode steps run in padded batch-size buckets (what a CUDA graph replays, here eagerly), and the steps
must really reach the Triton attention kernels.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraplex.engine.cuda_graphs import DecodeGraphs
from tests.engine.helpers import BASE, drive, make_core, prompts, request, tokens


def test_triton_and_torch_paths_agree_in_padded_decode_buckets_and_prompt_rows(
    tiny_models: dict[str, Path],
    tiny_adapters: dict[str, dict[str, Path]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("triton")
    import loraplex.engine.model.attention as engine_attention

    calls: dict[str, int] = {"decode": 0, "prefill": 0}
    for kind in calls:
        original = getattr(engine_attention, f"paged_{kind}")

        def counting(*args: object, _kind: str = kind, _original: object = original, **kwargs: object) -> object:
            calls[_kind] += 1
            return _original(*args, **kwargs)  # type: ignore[operator]

        monkeypatch.setattr(engine_attention, f"paged_{kind}", counting)

    adapters = {name: tiny_adapters["llama"][name] for name in ("embed-head-r8", "pattern-r8")}
    names = [*adapters, BASE]
    batch = prompts(len(names), 4, seed=9)
    results = {}
    for backend in ("torch", "triton"):
        core = make_core(tiny_models["llama"], adapters, lora_backend=backend, max_num_seqs=4)
        assert core.runner.lora.name == backend
        for i, (p, n) in enumerate(zip(batch, names, strict=True)):
            core.add_request(request(f"r{i}", p, n, max_new_tokens=3))
        rows = core.runner.run(core.scheduler.schedule(), num_logits=[4, 1, 4])

        core = make_core(tiny_models["llama"], adapters, lora_backend=backend, max_num_seqs=4)
        runner = core.runner
        runner.graphs = DecodeGraphs(runner.builder, runner._forward, 4, capture=False)
        reqs = [request(f"d{i}", p, n, max_new_tokens=3) for i, (p, n) in enumerate(zip(batch, names, strict=True))]
        deltas, _ = drive(core, reqs)
        assert runner.graphs.replays >= 2
        results[backend] = (rows, [tokens(deltas[f"d{i}"]) for i in range(len(names))])
        if backend == "torch":
            assert calls == {"decode": 0, "prefill": 0}, "the torch backend keeps the padded SDPA path"
    assert calls["decode"] and calls["prefill"], f"Triton steps should reach both paged kernels: {calls}"
    torch.testing.assert_close(results["triton"][0], results["torch"][0], atol=1e-4, rtol=0)
    assert results["triton"][1] == results["torch"][1]
