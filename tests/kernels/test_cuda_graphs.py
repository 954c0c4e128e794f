"""CUDA graphs of decode steps (``engine.cuda_graphs``) and graph capture of the LoRA embedding; skipped without
CUDA. Run on a GPU with ``pytest tests/kernels/test_cuda_graphs.py`` (bench/gpu_check.sh does).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (CUDA-graph capture)", allow_module_level=True)
pytest.importorskip("triton", reason="Triton is not installed")

from loraplex.kernels import reference
from loraplex.kernels.lora import make_backend
from loraplex.kernels.lora_step import LoRACapacity, LoRAStep
from tests.engine.helpers import BASE, drive, make_core, prompts, request, tokens
from tests.kernels.builders import make_module

DEVICE = torch.device("cuda")


def run(core: object, names: list[str]) -> tuple[list[list[int]], list[dict[str, torch.Tensor]]]:
    batch = prompts(len(names), 6, seed=4)
    reqs = [request(f"r{i}", p, n, max_new_tokens=3 + 2 * i) for i, (p, n) in enumerate(zip(batch, names, strict=True))]
    deltas, logits = drive(core, reqs, record_logits=True)  # type: ignore[arg-type]
    return [tokens(deltas[f"r{i}"]) for i in range(len(names))], logits


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graph_replays_match_eager_decode(
    dtype: str, tiny_models: dict[str, Path], tiny_adapters: dict[str, dict[str, Path]]
) -> None:
    adapters = {name: tiny_adapters["llama"][name] for name in ("embed-head-r8", "all-r64", "qv-r4")}
    names = [*adapters, BASE, "all-r64"]
    common = dict(device="cuda", dtype=dtype, max_num_seqs=8)
    eager = make_core(tiny_models["llama"], adapters, enforce_eager=True, **common)
    assert eager.runner.graphs is None
    graphed = make_core(tiny_models["llama"], adapters, **common)
    assert graphed.runner.graphs is not None and graphed.runner.lora.name == "triton"
    eager_tokens, eager_logits = run(eager, names)
    graph_tokens, graph_logits = run(graphed, names)
    assert graphed.runner.graphs.replays >= 4
    assert graph_tokens == eager_tokens
    atol = 1e-4 if dtype == "float32" else 5e-2
    for want, got in zip(eager_logits, graph_logits, strict=True):
        for rid in want:
            torch.testing.assert_close(got[rid], want[rid], atol=atol, rtol=0)


def test_torch_backend_on_cuda_runs_eagerly(tiny_models: dict[str, Path]) -> None:
    core = make_core(tiny_models["llama"], device="cuda", lora_backend="torch")
    assert core.runner.graphs is None  # the torch path plans from host segments: not capturable


def test_embedding_and_apply_replay_with_new_step_contents() -> None:
    """Capture the Triton backend's embedding + apply once on padded metadata, then re-prepare and replay."""
    gen = torch.Generator().manual_seed(0)
    ranks = [8, 0, 16, 64, 4, 32]
    backend = make_backend("triton", LoRACapacity(64, 64, len(ranks)), DEVICE)
    emb = make_module(gen, ranks, 64, 500, 256, torch.bfloat16, DEVICE)
    lin = make_module(gen, ranks, 64, 256, 512, torch.bfloat16, DEVICE)
    from loraplex.kernels.types import LoRASlice

    slices = [LoRASlice(lin, 0)]
    ids = torch.randint(0, 500, (16,), device=DEVICE)
    x = torch.randn(16, 256, device=DEVICE).bfloat16()
    emb_out = torch.zeros(16, 256, device=DEVICE).bfloat16()
    lin_out = torch.zeros(16, 512, device=DEVICE).bfloat16()

    def step() -> None:
        emb_out.zero_()
        lin_out.zero_()
        backend.embedding(ids, emb, emb_out, backend.tokens)
        backend.apply(x, lin_out, slices, backend.tokens)

    backend.prepare(LoRAStep([0, 2, 3, -1] * 4, [1] * 16, [1] * 16, pad_to=16))
    step()  # warm-up: autotune + pointer tables outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for slots in ([5, 5, 4, 3, 2, 0, -1, 2], [3] * 16):
        step_slots = slots + [-1] * (16 - len(slots))
        tokens_batch, _ = backend.prepare(LoRAStep(step_slots, [1] * 16, [1] * 16, pad_to=16))
        ids.copy_(torch.randint(0, 500, (16,), device=DEVICE))
        graph.replay()
        torch.cuda.synchronize()
        want_emb = torch.zeros_like(emb_out)
        reference.lora_embedding_ref(ids, tokens_batch, emb, want_emb)
        torch.testing.assert_close(emb_out.float(), want_emb.float(), atol=6e-2, rtol=2e-2)
        want_lin = torch.zeros_like(lin_out)
        y = torch.zeros(16, 64, device=DEVICE)
        reference.lora_shrink_ref(x, tokens_batch, lin, y)
        reference.lora_expand_ref(y, tokens_batch, lin, want_lin)
        torch.testing.assert_close(lin_out.float(), want_lin.float(), atol=6e-2, rtol=2e-2)
