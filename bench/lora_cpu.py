"""CPU: what does each distinct adapter cost a decode step of the engine (torch LoRA path)?

Question answered: with 64 running sequences, how does the time of one step grow with the number of distinct
adapters among them (0 = base model only, then 1, 8, 16, 32, 64)? Issue 11 measured ~1 ms per distinct adapter
per step at hidden 256, 4 layers; the target is a step cost that follows the adapters' bytes, not their count.

Setup: one random Llama (``--hidden``, ``--layers``, ``--vocab``), synthetic adapters built in memory (ranks
8/16/32 cycled, all seven linear modules, random weights), request i uses adapter i mod n. Two workloads per n:
  * steady: 64 sequences decoding together (the same adapters every step);
  * churn: ``--requests`` requests of 8..40 new tokens through 64 sequence slots, so sequences finish and join
    (prefill chunks mixed in) and the step's set of adapters keeps changing, as in serving.
Reported: ms per decode-only step (steady and churn) and ms per step of any kind (churn), each also as a ratio to
the base-only run of the same sitting. Best of ``--repeats``. Times are CPU seconds of this process
(``time.process_time``): with ``--threads 1`` that is wall time on a quiet machine, and far steadier on a shared one.

    .venv/bin/python bench/lora_cpu.py [--hidden 256] [--layers 4] [--vocab 32000] [--threads 1] [--repeats 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from loraplex.engine.adapters.host import HostAdapter
from loraplex.engine.adapters.types import ModuleLoRA
from loraplex.engine.config import EngineConfig
from loraplex.engine.core import EngineCore
from loraplex.engine.request import GenerationRequest
from loraplex.engine.sampling import SamplingParams
from loraplex.services.demo_assets import ALL_LINEAR, build_model

RANKS = (8, 16, 32)
SEQS = 64


def synthetic_adapter(core: EngineCore, rank: int, seed: int) -> HostAdapter:
    g = torch.Generator().manual_seed(seed)
    shapes = core.loaded.spec.module_shapes()
    modules = {}
    for layer in range(core.loaded.args.num_layers):
        for name in ALL_LINEAR:
            h_in, h_out = shapes[name]
            modules[(layer, name)] = ModuleLoRA(
                a=torch.randn(rank, h_in, generator=g) * 0.02, b=torch.randn(h_out, rank, generator=g) * 0.02, scale=2.0
            )
    return HostAdapter(modules=modules, rank=rank)


@dataclass
class Timings:
    steady_decode: float  # s per decode-only step, steady batch
    churn_decode: float  # s per decode-only step, churning batch
    churn_step: float  # s per step of any kind, churning batch


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
        core.host.add(f"a{i}", synthetic_adapter(core, RANKS[i % len(RANKS)], i))
    return core


def run(model_dir: Path, n: int, requests: int, steady_steps: int, vocab: int) -> Timings:
    g = torch.Generator().manual_seed(0)
    # steady: 64 sequences, long outputs; time only decode-only steps after every prompt is in
    core = make_core(model_dir, n)
    for i in range(SEQS):
        prompt = torch.randint(3, vocab, (16,), generator=g).tolist()
        params = SamplingParams(max_new_tokens=steady_steps + 8, ignore_eos=True)
        core.add_request(GenerationRequest(f"s{i}", prompt, params, adapter_key=f"a{i % n}" if n else None))
    for _ in range(3):
        core.step()
    start = time.process_time()
    for _ in range(steady_steps):
        core.step()
    steady = (time.process_time() - start) / steady_steps

    core = make_core(model_dir, n)
    for i in range(requests):
        prompt = torch.randint(3, vocab, (int(torch.randint(8, 33, (1,), generator=g)),), generator=g).tolist()
        new = int(torch.randint(8, 41, (1,), generator=g))
        params = SamplingParams(max_new_tokens=new, ignore_eos=True)
        core.add_request(GenerationRequest(f"c{i}", prompt, params, adapter_key=f"a{i % n}" if n else None))
    decode_s, decode_n, total_s, total_n = 0.0, 0, 0.0, 0
    while core.has_work():
        running = core.scheduler.running
        decode_only = bool(running) and not core.scheduler.waiting and all(s.num_pending == 1 for s in running)
        start = time.process_time()
        core.step()
        elapsed = time.process_time() - start
        total_s, total_n = total_s + elapsed, total_n + 1
        if decode_only:
            decode_s, decode_n = decode_s + elapsed, decode_n + 1
    return Timings(steady, decode_s / max(1, decode_n), total_s / max(1, total_n))


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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    heads = max(8, args.hidden // 64)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(
            Path(tmp) / "model",
            arch="llama",
            hidden_size=args.hidden,
            intermediate_size=-(-args.hidden * 8 // 3 // 64) * 64,
            num_hidden_layers=args.layers,
            num_attention_heads=heads,
            num_key_value_heads=heads // 2,
            max_position_embeddings=512,
            vocab_size=args.vocab,
        )
        run(model_dir, 2, 8, 2, args.vocab)  # warm-up
        best: dict[int, Timings] = {}
        for _ in range(args.repeats):
            for n in args.distinct:
                t = run(model_dir, n, args.requests, args.steady_steps, args.vocab)
                old = best.get(n)
                best[n] = (
                    t if old is None else Timings(*(min(a, b) for a, b in zip(vars(old).values(), vars(t).values())))
                )
    base = best.get(0)
    print(
        f"llama hidden={args.hidden} layers={args.layers} vocab={args.vocab}, {SEQS} sequences, ranks {RANKS} cycled, "
        f"threads={args.threads}, best of {args.repeats}"
    )
    print(
        f"{'distinct':>8} {'steady decode ms':>17} {'x base':>7} {'churn decode ms':>16} {'x base':>7} {'churn step ms':>14} {'x base':>7}"
    )
    for n, t in best.items():
        ratios = (
            [t.steady_decode / base.steady_decode, t.churn_decode / base.churn_decode, t.churn_step / base.churn_step]
            if base
            else [float("nan")] * 3
        )
        print(
            f"{n:>8} {t.steady_decode * 1e3:17.2f} {ratios[0]:7.2f} {t.churn_decode * 1e3:16.2f} {ratios[1]:7.2f}"
            f" {t.churn_step * 1e3:14.2f} {ratios[2]:7.2f}"
        )


if __name__ == "__main__":
    main()
