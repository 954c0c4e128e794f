"""CPU: what does each distinct adapter cost a step of the engine (torch LoRA path)?

Question answered: with 64 running sequences, how do the step time and the LoRA share of it grow with the number
of distinct adapters among them (0 = base model only, then 1, 8, 16, 32, 64)? Issue 11 measured ~1 ms per
distinct adapter per step at hidden 256, 4 layers; the target is a LoRA cost that follows the adapters' bytes,
not their count, and no per-step rebuild cost when the batch's adapters change.

Setup: one random Llama (``--hidden``, ``--layers``, ``--vocab``), synthetic adapters built in memory (ranks
8/16/32 cycled, all seven linear modules, random weights), request i uses adapter i mod n. Two workloads per n:
  * steady: 64 sequences decoding together (the same adapters every step);
  * churn: ``--requests`` requests of 8..40 new tokens through 64 sequence slots, so sequences finish and join
    (prefill chunks mixed in) and the step's set of adapters keeps changing, as in serving.
Reported per n: ms per decode-only step (steady; churn), the LoRA part of it (time inside the backend's
``apply``/``embedding``), and ms per step of any kind (churn), with ratios to the base-only run of the same
sitting. Best of ``--repeats``. Times are CPU seconds of this process (``time.process_time``): with
``--threads 1`` that is wall time on a quiet machine, and far steadier on a shared one.

``--calibrate`` instead measures the torch path's cost-model constants on this CPU (``kernels.torch_lora``):
TILE_COST_CELLS from one adapter's 64 tokens as one 64-token tile vs 64 one-token tiles, CHUNK_COST_ROWS from a
rank-64 adapter as one 64-row chunk vs sixteen 4-row chunks, both at ``--hidden``.

    .venv/bin/python bench/lora_cpu.py [--hidden 256] [--layers 4] [--vocab 32000] [--threads 1] [--repeats 2]
    .venv/bin/python bench/lora_cpu.py --calibrate [--hidden 256]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from bench_models import llama_shaped

from loraplex.engine.adapters.host import HostAdapter
from loraplex.engine.adapters.types import ModuleLoRA
from loraplex.engine.config import EngineConfig
from loraplex.engine.core import EngineCore
from loraplex.engine.request import GenerationRequest
from loraplex.engine.sampling import SamplingParams
from loraplex.services.demo_assets import ALL_LINEAR

RANKS = (8, 16, 32)
SEQS = 64


def synthetic_adapter(core: EngineCore, rank: int, seed: int) -> HostAdapter:
    g = torch.Generator().manual_seed(seed)
    shapes = core.loaded.spec.module_shapes()
    modules = {}
    for layer in range(core.loaded.args.num_layers):
        for name in ALL_LINEAR:
            h_in, h_out = shapes[name]
            a = torch.randn(rank, h_in, generator=g) * 0.02
            modules[(layer, name)] = ModuleLoRA(a=a, b=torch.randn(h_out, rank, generator=g) * 0.02, scale=2.0)
    return HostAdapter(modules=modules, rank=rank)


@contextmanager
def lora_timer(core: EngineCore, into: list[float]) -> Iterator[None]:
    """Accumulate CPU seconds spent in the engine's LoRA backend into ``into[0]``."""
    backend = core.runner.lora
    originals = {name: getattr(backend, name) for name in ("apply", "embedding")}

    def timed(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any) -> Any:
            start = time.process_time()
            try:
                return fn(*args)
            finally:
                into[0] += time.process_time() - start

        return wrapper

    for name, fn in originals.items():
        setattr(backend, name, timed(fn))
    try:
        yield
    finally:
        for name in originals:
            delattr(backend, name)


@dataclass
class Timings:
    steady_decode: float  # s per decode-only step, steady batch
    steady_lora: float  # s of it in LoRA
    churn_decode: float  # s per decode-only step, churning batch
    churn_lora: float  # s of it in LoRA
    churn_step: float  # s per step of any kind, churning batch

    def best(self, other: Timings | None) -> Timings:
        if other is None:
            return self
        return Timings(*(min(getattr(self, f.name), getattr(other, f.name)) for f in fields(self)))


def make_core(model_dir: Path, n: int) -> EngineCore:
    core = EngineCore.load(
        EngineConfig(
            model_dir=model_dir,
            dtype="float32",
            max_num_seqs=SEQS,
            max_adapters_per_step=max(1, n),
            max_lora_rank=32,
            kv_cache_blocks=4096,
            max_num_batched_tokens=1024,
        )
    )
    for i in range(n):
        core.residency.add(f"a{i}", synthetic_adapter(core, RANKS[i % len(RANKS)], i))
    return core


def run(model_dir: Path, n: int, requests: int, steady_steps: int, vocab: int) -> Timings:
    g = torch.Generator().manual_seed(0)
    core = make_core(model_dir, n)
    for i in range(SEQS):
        prompt = torch.randint(3, vocab, (16,), generator=g).tolist()
        params = SamplingParams(max_new_tokens=steady_steps + 8, ignore_eos=True)
        core.add_request(GenerationRequest(f"s{i}", prompt, params, adapter_key=f"a{i % n}" if n else None))
    for _ in range(3):
        core.step()
    lora = [0.0]
    start = time.process_time()
    with lora_timer(core, lora):
        for _ in range(steady_steps):
            core.step()
    steady, steady_lora = (time.process_time() - start) / steady_steps, lora[0] / steady_steps

    core = make_core(model_dir, n)
    for i in range(requests):
        prompt = torch.randint(3, vocab, (int(torch.randint(8, 33, (1,), generator=g)),), generator=g).tolist()
        params = SamplingParams(max_new_tokens=int(torch.randint(8, 41, (1,), generator=g)), ignore_eos=True)
        core.add_request(GenerationRequest(f"c{i}", prompt, params, adapter_key=f"a{i % n}" if n else None))
    decode_s = decode_lora = total_s = 0.0
    decode_n = total_n = 0
    with lora_timer(core, lora):
        while core.has_work():
            running = core.scheduler.running
            decode_only = bool(running) and not core.scheduler.waiting and all(s.num_pending == 1 for s in running)
            lora[0] = 0.0
            start = time.process_time()
            core.step()
            elapsed = time.process_time() - start
            total_s, total_n = total_s + elapsed, total_n + 1
            if decode_only:
                decode_s, decode_lora, decode_n = decode_s + elapsed, decode_lora + lora[0], decode_n + 1
    n_dec = max(1, decode_n)
    return Timings(steady, steady_lora, decode_s / n_dec, decode_lora / n_dec, total_s / max(1, total_n))


def calibrate(hidden: int, reps: int) -> None:
    """Measure TILE_COST_CELLS and CHUNK_COST_ROWS (see the module docstring) with the real torch path."""
    from loraplex.kernels import torch_lora
    from loraplex.kernels.types import LoRABatch, LoRAModuleWeights, LoRASlice

    g = torch.Generator().manual_seed(0)
    h_out = hidden * 3

    def weights(rank: int) -> list[LoRASlice]:
        w = LoRAModuleWeights(
            a_rows=torch.randn(rank, hidden, generator=g),
            b_rows=torch.randn(rank, h_out, generator=g),
            row_table=torch.arange(rank, dtype=torch.int32).view(1, rank),
            ranks=torch.tensor([rank], dtype=torch.int32),
            scales=torch.ones(1),
        )
        return [LoRASlice(w, 0)]

    def seconds(tokens: int, rank: int, width: int, chunk: int, rebuild: bool) -> float:
        """CPU seconds of one apply; ``rebuild``: the chunked weights are rebuilt every call (a step whose
        adapters changed), else reused (steady decoding)."""
        slices, batch = weights(rank), LoRABatch.from_slots([0] * tokens)
        x, out = torch.randn(tokens, hidden, generator=g), torch.zeros(tokens, h_out)
        plan, cache = torch_lora.TilePlan.build(batch, width), torch_lora.ChunkCache(chunk)
        torch_lora.apply(x, out, slices, plan, cache)
        best = float("inf")
        for _ in range(reps):
            start = time.process_time()
            for _ in range(20):
                torch_lora.apply(x, out, slices, plan, torch_lora.ChunkCache(chunk) if rebuild else cache)
            best = min(best, (time.process_time() - start) / 20)
        return best

    for rebuild in (False, True):
        kind = "rebuilt every step" if rebuild else "reused"
        # tiles·N + tiles·X: one 64-token tile costs 64 + X, 64 one-token tiles cost 64·(1 + X).
        r = seconds(64, 16, 1, 16, rebuild) / seconds(64, 16, 64, 16, rebuild)
        tile_cells = 64 * (r - 1) / max(1e-9, 64 - r)
        # chunks·c + chunks·Y: one 64-row chunk costs 64 + Y, sixteen 4-row chunks cost 64 + 16·Y.
        q = seconds(8, 64, 8, 4, rebuild) / seconds(8, 64, 8, 64, rebuild)
        chunk_rows = 64 * (q - 1) / max(1e-9, 16 - q)
        print(
            f"hidden {hidden}, weights {kind}: 64 one-token tiles / one 64-token tile = {r:.2f}x -> "
            f"TILE_COST_CELLS ~ {tile_cells:.1f}; sixteen 4-row chunks / one 64-row chunk = {q:.2f}x -> "
            f"CHUNK_COST_ROWS ~ {chunk_rows:.1f}"
        )
    print(f"in use: TILE_COST_CELLS = {torch_lora.TILE_COST_CELLS}, CHUNK_COST_ROWS = {torch_lora.CHUNK_COST_ROWS}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--steady-steps", type=int, default=20)
    parser.add_argument("--distinct", type=int, nargs="*", default=[0, 1, 8, 16, 32, 64])
    parser.add_argument("--calibrate", action="store_true", help="measure the torch path's cost-model constants")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.calibrate:
        calibrate(args.hidden, args.repeats)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = llama_shaped(Path(tmp) / "model", args.hidden, args.layers, args.vocab)
        run(model_dir, 2, 8, 2, args.vocab)  # warm-up
        best: dict[int, Timings] = {}
        for _ in range(args.repeats):
            for n in args.distinct:
                best[n] = run(model_dir, n, args.requests, args.steady_steps, args.vocab).best(best.get(n))
    base = best.get(0)
    print(
        f"llama hidden={args.hidden} layers={args.layers} vocab={args.vocab}, {SEQS} sequences, ranks {RANKS} "
        f"cycled, threads={args.threads}, best of {args.repeats}; ms per step (x base-only)"
    )
    print(
        f"{'distinct':>8} | {'steady decode':>15} {'LoRA':>6} | {'churn decode':>15} {'LoRA':>6} | {'churn step':>15}"
    )
    for n, t in best.items():

        def cell(value: float, base_value: float | None) -> str:
            ratio = f"({value / base_value:4.2f})" if base_value else ""
            return f"{value * 1e3:8.1f} {ratio:>6}"

        print(
            f"{n:>8} | {cell(t.steady_decode, base and base.steady_decode)} {t.steady_lora * 1e3:6.1f}"
            f" | {cell(t.churn_decode, base and base.churn_decode)} {t.churn_lora * 1e3:6.1f}"
            f" | {cell(t.churn_step, base and base.churn_step)}"
        )


if __name__ == "__main__":
    main()
