"""The engine driven through the Triton path end to end (LoRA shrink/expand and paged decode attention).

On CPU this runs the real kernels in Triton's interpreter (see conftest), so it is kept tiny: the same mixed
batch must give the same greedy tokens as the torch path, and decode steps must really reach the decode kernel.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from loraplex.kernels import attention, lora
from tests.engine.helpers import BASE, drive, make_core, prompts, request, tokens


@pytest.fixture
def triton_backend() -> Iterator[None]:
    before = lora.get_backend()
    lora.set_backend("triton")
    try:
        yield
    finally:
        lora.set_backend(before)


def run(model_dir: Path, adapters: dict[str, Path]) -> list[list[int]]:
    names = [*adapters, BASE]
    batch = prompts(len(names), 5, seed=3)
    core = make_core(model_dir, adapters)
    reqs = [request(f"r{i}", p, n, max_new_tokens=3) for i, (p, n) in enumerate(zip(batch, names, strict=True))]
    deltas, _ = drive(core, reqs)
    return [tokens(deltas[f"r{i}"]) for i in range(len(names))]


def test_engine_tokens_match_between_torch_and_triton_paths(
    tiny_models: dict[str, Path],
    tiny_adapters: dict[str, dict[str, Path]],
    triton_backend: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("triton")
    adapters = {name: tiny_adapters["llama"][name] for name in ("qv-r4", "pattern-r8")}
    decode_calls: list[int] = []
    original = attention.paged_attention_decode

    def counting(*args: object, **kwargs: object) -> object:
        decode_calls.append(1)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    import loraplex.engine.model.attention as engine_attention

    monkeypatch.setattr(engine_attention, "paged_attention_decode", counting)
    on_triton = run(tiny_models["llama"], adapters)
    assert decode_calls, "decode steps should go through the paged decode kernel"
    lora.set_backend("torch")
    on_torch = run(tiny_models["llama"], adapters)
    assert on_triton == on_torch
