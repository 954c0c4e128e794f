"""The engine driven through the Triton path end to end (LoRA shrink/expand, paged prefill and decode attention).

On CPU this runs the real kernels in Triton's interpreter (see conftest), so it is kept tiny: the same mixed
batch must give the same greedy tokens as the torch path, and steps must really reach the Triton kernels.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine.helpers import BASE, drive, make_core, prompts, request, tokens


def run(model_dir: Path, adapters: dict[str, Path], backend: str) -> list[list[int]]:
    names = [*adapters, BASE]
    batch = prompts(len(names), 5, seed=3)
    core = make_core(model_dir, adapters, lora_backend=backend)
    assert core.runner.lora.name == backend
    reqs = [request(f"r{i}", p, n, max_new_tokens=3) for i, (p, n) in enumerate(zip(batch, names, strict=True))]
    deltas, _ = drive(core, reqs)
    return [tokens(deltas[f"r{i}"]) for i in range(len(names))]


def test_engine_tokens_match_between_torch_and_triton_paths(
    tiny_models: dict[str, Path],
    tiny_adapters: dict[str, dict[str, Path]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("triton")
    import loraplex.engine.model.attention as engine_attention

    adapters = {name: tiny_adapters["llama"][name] for name in ("qv-r4", "pattern-r8")}
    calls: dict[str, int] = {"decode": 0, "prefill": 0}
    for kind in calls:
        original = getattr(engine_attention, f"paged_{kind}")

        def counting(*args: object, _kind: str = kind, _original: object = original, **kwargs: object) -> object:
            calls[_kind] += 1
            return _original(*args, **kwargs)  # type: ignore[operator]

        monkeypatch.setattr(engine_attention, f"paged_{kind}", counting)
    on_triton = run(tiny_models["llama"], adapters, "triton")
    assert calls["decode"] and calls["prefill"], f"steps should reach both paged kernels: {calls}"
    on_torch = run(tiny_models["llama"], adapters, "torch")
    assert on_triton == on_torch
