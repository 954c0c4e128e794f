"""CPU: what do DoRA, adapter mixes and a merged hot adapter cost a decode step? (issue 12)

Questions answered, each as a ratio to a baseline measured in the same sitting:
  * DoRA vs plain LoRA of equal rank: the added step time of applying DoRA's per-column factor (goal ≤ 10%).
  * A CAT mix of two rank-r/2 adapters vs one adapter of rank r: the mix is rank r too (goal ≤ 1.1x).
  * A merged hot adapter: its own requests vs base-only requests (goal ≥ 0.98 of base throughput), and what the
    merged adapter's negated delta costs every other row (other adapters' requests with and without a merge).

Setup: one random Llama (``--hidden``, ``--layers``, ``--vocab``) driven step by step through ``EngineCore``;
synthetic adapters built in memory (all seven linear modules, random weights; DoRA ones with a magnitude);
``--seqs`` sequences decoding together, ``--adapters`` distinct adapters among them. Reported: ms per decode step
(best of ``--repeats`` runs of ``--steps`` steps, CPU seconds of this process: steadier than wall time on a shared
machine; use ``--threads 1`` for the quietest figures).

    .venv/bin/python bench/lora_family.py [--hidden 256] [--layers 4] [--seqs 16] [--adapters 4] [--rank 16]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_models import small_llama

from loraplex.engine.adapters.host import HostAdapter
from loraplex.engine.adapters.mix import Mix, MixMember, MixMethod, mix_modules
from loraplex.engine.adapters.types import ModuleLoRA
from loraplex.engine.config import EngineConfig
from loraplex.engine.core import EngineCore
from loraplex.engine.request import GenerationRequest
from loraplex.engine.sampling import SamplingParams
from loraplex.services.demo_assets import ALL_LINEAR


def synthetic(core: EngineCore, rank: int, seed: int, dora: bool = False) -> HostAdapter:
    g = torch.Generator().manual_seed(seed)
    shapes = core.loaded.spec.module_shapes()
    modules = {}
    for layer in range(core.loaded.args.num_layers):
        for name in ALL_LINEAR:
            h_in, h_out = shapes[name]
            magnitude = (torch.rand(h_out, generator=g) + 0.5) if dora else None
            modules[(layer, name)] = ModuleLoRA(
                a=torch.randn(rank, h_in, generator=g) * 0.02,
                b=torch.randn(h_out, rank, generator=g) * 0.02,
                scale=2.0,
                magnitude=magnitude,
            )
    return HostAdapter(modules=modules, rank=rank)


def cat_mix(core: EngineCore, rank: int, seed: int) -> HostAdapter:
    """A CAT mix of two rank/2 adapters, built as the engine builds it (rank ``rank``)."""
    halves = [synthetic(core, rank // 2, seed + k) for k in range(2)]
    members = tuple(MixMember(f"m{k}", "bench", h.modules) for k, h in enumerate(halves))
    modules = mix_modules(Mix(members=members, weights=(0.6, 0.4), method=MixMethod.CAT))
    return HostAdapter(modules=modules, rank=max(m.rank for m in modules.values()))


def decode_ms(core: EngineCore, keys: list[str | None], args: argparse.Namespace, tag: str) -> float:
    """CPU ms per decode step, one run of ``args.steps`` steps, with one sequence per entry of ``keys``."""
    params = SamplingParams(max_new_tokens=args.steps + 4, ignore_eos=True)
    for i, key in enumerate(keys):
        core.add_request(GenerationRequest(f"{tag}-{i}", [5 + i % 50, 6, 7, 8], params, adapter_key=key))
    core.step()  # prefill every sequence
    core.step()
    start = time.process_time()
    for _ in range(args.steps):
        core.step()
    elapsed = (time.process_time() - start) / args.steps * 1e3
    while core.has_work():
        core.step()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seqs", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = small_llama(Path(tmp) / "model", args.hidden, args.layers, vocab_size=args.vocab)
        config = EngineConfig(
            model_dir=model_dir,
            dtype="float32",
            kv_cache_blocks=4096,
            max_num_seqs=args.seqs,
            max_adapters_per_step=64,
            max_lora_rank=max(64, args.rank),
            max_dora_adapters=args.adapters + 1,
        )
        core = EngineCore.load(config)
        n, r = args.adapters, args.rank
        make: dict[str, Callable[[int], HostAdapter]] = {
            "lora": lambda i: synthetic(core, r, i),
            "dora": lambda i: synthetic(core, r, 100 + i, dora=True),
            "mix": lambda i: cat_mix(core, r, 200 + 10 * i),
        }
        for kind, build in make.items():
            for i in range(n):
                core.residency.add(f"{kind}{i}", build(i))
        per = [i % n for i in range(args.seqs)]
        others = [f"lora{1 + k % max(1, n - 1)}" for k in per]
        # (name, merged?, keys): measured round-robin, best of the rounds, so a noisy spell on a shared machine
        # hits every workload alike instead of one of them
        workloads: list[tuple[str, bool, list[str | None]]] = [
            ("base", False, [None] * args.seqs),
            *((kind, False, [f"{kind}{k}" for k in per]) for kind in make),
            ("others_plain", False, list(others)),
            ("merged_own", True, ["lora0"] * args.seqs),
            ("others_merged", True, list(others)),
            ("base_merged", True, [None] * args.seqs),
        ]
        best: dict[str, float] = {}
        for repeat in range(args.repeats):
            for name, merged, keys in workloads:
                if merged and core.merged is None:
                    core.merge_adapter("lora0")
                elif not merged and core.merged is not None:
                    core.unmerge_adapter()
                ms = decode_ms(core, keys, args, f"{name}{repeat}")
                best[name] = min(best.get(name, float("inf")), ms)
        if core.merged is not None:
            core.unmerge_adapter()
    base, rows = best["base"], {kind: best[kind] for kind in make}
    merged_own, others_merged, base_merged = best["merged_own"], best["others_merged"], best["base_merged"]
    others_plain = best["others_plain"]
    print(
        f"hidden {args.hidden}, {args.layers} layers, {args.seqs} sequences, {n} distinct adapters of rank {r}, "
        f"{args.threads} thread(s); CPU ms per decode step "
        f"(best of {args.repeats} interleaved rounds x {args.steps} steps)\n"
    )
    print("| workload | ms/step | ratio | goal |\n|---|---|---|---|")
    print(f"| base model only | {base:.2f} | 1.00 | |")
    print(f"| LoRA rank {r} | {rows['lora']:.2f} | {rows['lora'] / base:.2f} x base | |")
    print(f"| DoRA rank {r} | {rows['dora']:.2f} | {rows['dora'] / rows['lora']:.3f} x LoRA | ≤ 1.10 |")
    print(
        f"| CAT mix of 2 x rank {r // 2} | {rows['mix']:.2f} | "
        f"{rows['mix'] / rows['lora']:.3f} x rank-{r} LoRA | ≤ 1.1 |"
    )
    print(f"| merged adapter's own rows | {merged_own:.2f} | {base / merged_own:.3f} of base throughput | ≥ 0.98 |")
    print(f"| base rows while merged | {base_merged:.2f} | {base_merged / base:.2f} x base (negated delta) | report |")
    print(
        f"| other adapters while merged | {others_merged:.2f} | "
        f"{others_merged / others_plain:.2f} x unmerged | report |"
    )


if __name__ == "__main__":
    main()
