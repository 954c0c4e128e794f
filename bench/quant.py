"""Quantized bases: weight memory and tokens/s for none / int8 / nf4 on the same model and workload.

Question answered: what does serving on an NF4 (double-quantized) or int8 base save in weight bytes, and what does
it cost or gain in throughput, with and without a mixed batch of 8 LoRA adapters? Baseline: the same engine on the
unquantized base (``none``), measured in the same run.

Setup (identical for every contender):
  * one random Llama-family checkpoint saved in fp32 (``--hidden``, ``--layers``, ``--vocab``; intermediate = 8/3 x
    hidden rounded to 64, head_dim 64, kv heads = heads / 2), served in ``--dtype``; the quantized contenders
    quantize that same checkpoint at load (``load_model(..., quantization=...)``);
  * 8 real PEFT adapters (ranks 4..64, mixed targets; ``engine_cpu.ZOO``); ``--requests`` random prompts of
    ``--prompt-len`` tokens, each generating exactly ``--new-tokens`` tokens greedily; request i uses adapter i % 8
    (the "mixed LoRA" column) or no adapter ("base");
  * each contender runs ``--repeats`` times on a fresh engine, interleaved with the others so load on a shared
    machine hits all alike; best run reported, as tokens per wall second and per CPU second (process time, far
    less sensitive to other processes on a shared machine).
Also reported: ``LoadedModel.weight_bytes`` (all weights on the device) of each base loaded in bf16 and its ratio to
the unquantized bf16 model (the issue's reference point), the projections-only ratio, the same ratios computed for
Llama-2-7B and Llama-3-8B shapes (analytic, from the storage formula the loader uses; embeddings and lm_head stay
bf16), and the cost of one projection matmul (decode T=1 and prefill T=128): dense vs quantized (on CPU the
quantized path dequantizes the weight per call; on CUDA it is one Triton kernel per part).

    .venv/bin/python bench/quant.py [--hidden 512] [--layers 4] [--vocab 8000] [--requests 16] [--prompt-len 32]
                                    [--new-tokens 16] [--dtype float32] [--device cpu] [--threads N] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from bench_models import llama_shaped
from engine_cpu import ZOO, word_tokenizer

from loraplex.engine.adapters.host import HostAdapter
from loraplex.engine.config import EngineConfig
from loraplex.engine.core import EngineCore
from loraplex.engine.model.build import LoadedModel, load_model
from loraplex.engine.model.layers import Linear
from loraplex.engine.model.quant_int8 import quantize_int8
from loraplex.engine.model.quant_linear import QuantizedLinear
from loraplex.engine.model.quant_nf4 import quantize_nf4
from loraplex.engine.request import GenerationRequest
from loraplex.engine.sampling import SamplingParams
from loraplex.services.demo_assets import build_adapter

METHODS = ("none", "int8", "nf4")


def nf4_part_bytes(n: int, k: int) -> int:
    """Bytes of one NF4+DQ projection as the loader stores it (see ``quant_nf4``)."""
    blocks = math.ceil(n * k / 64)
    return math.ceil(n * k / 2) + blocks + 4 * math.ceil(blocks / 256) + 4 + 16 * 4 + 256 * 4


# name -> (hidden, intermediate, layers, vocab, q rows, kv rows)
REAL_SHAPES = {"Llama-2-7B": (4096, 11008, 32, 32000, 4096, 4096), "Llama-3-8B": (4096, 14336, 32, 128256, 4096, 1024)}


def nf4_ratio(shape: tuple[int, int, int, int, int, int]) -> tuple[float, float]:
    """(NF4 whole model / bf16, NF4 projections / bf16) for real model shapes, from the storage formula."""
    hidden, inter, layers, vocab, q, kv = shape
    shapes = [(q, hidden), (kv, hidden), (kv, hidden), (hidden, q), (inter, hidden), (inter, hidden), (hidden, inter)]
    proj_params = layers * sum(n * k for n, k in shapes)
    proj_nf4 = layers * sum(nf4_part_bytes(n, k) for n, k in shapes)
    rest = 2 * (2 * vocab * hidden + (2 * layers + 1) * hidden)  # embeddings, lm_head, norms in bf16
    return (proj_nf4 + rest) / (2 * proj_params + rest), proj_nf4 / (2 * proj_params)


def projection_bytes(loaded: LoadedModel) -> int:
    total = 0
    for module in loaded.model.modules():
        if isinstance(module, (Linear, QuantizedLinear)):
            total += sum(t.untyped_storage().nbytes() for t in [*module.parameters(), *module.buffers()])
    return total


def run(core: EngineCore, prompts: list[list[int]], names: list[str | None], new_tokens: int) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second) for the whole workload, stepped to completion."""
    for i, (prompt, name) in enumerate(zip(prompts, names, strict=True)):
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        core.add_request(GenerationRequest(f"r{i}", prompt, params, adapter_key=name))
    generated = 0
    wall, cpu = time.perf_counter(), time.process_time()
    while core.has_work():
        generated += sum(len(e.token_ids) for e in core.step() if hasattr(e, "token_ids"))
    if core.device.type == "cuda":
        torch.cuda.synchronize()
    return generated / (time.perf_counter() - wall), generated / max(time.process_time() - cpu, 1e-9)


def make_core(model_dir: Path, adapters: dict[str, Path], method: str, dtype: str, device: str) -> EngineCore:
    config = EngineConfig(
        model_dir=model_dir,
        device=device,
        dtype=dtype,
        max_adapters_per_step=len(adapters),
        kv_cache_blocks=1024,
        max_lora_rank=64,
        quantization=method,
    )
    loaded = load_model(model_dir, dtype, torch.device(device), None, method)
    core = EngineCore(config, loaded)
    for name, path in adapters.items():
        core.residency.add(name, HostAdapter.from_peft_dir(path, core.loaded.spec, 64))
    return core


def matmul_ms(n: int, k: int, t: int, dtype: torch.dtype, device: torch.device, reps: int = 20) -> dict[str, float]:
    """Time of one [T, k] x [n, k]ᵀ projection per path (dense Linear, int8, nf4)."""
    weight = (torch.randn(n, k) * 0.02).to(device, dtype)
    modules = {
        "none": Linear(weight, None),
        "int8": QuantizedLinear([quantize_int8(weight)], None, dtype),
        "nf4": QuantizedLinear([quantize_nf4(weight)], None, dtype),
    }
    x = torch.randn(t, k, device=device, dtype=dtype)
    out: dict[str, float] = {}
    for name, module in modules.items():
        with torch.inference_mode():
            module(x, None)  # type: ignore[arg-type]  # projections never read the step context
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(reps):
                module(x, None)  # type: ignore[arg-type]
            if device.type == "cuda":
                torch.cuda.synchronize()
        out[name] = (time.perf_counter() - start) / reps * 1e3
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = llama_shaped(root / "model", args.hidden, args.layers, args.vocab)
        word_tokenizer(model_dir, args.vocab)
        adapters = {name: build_adapter(model_dir, root / name, spec) for name, spec in ZOO.items()}
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, args.vocab, (args.requests, args.prompt_len), generator=g).tolist()
        mixed: list[str | None] = [list(adapters)[i % len(adapters)] for i in range(args.requests)]
        base: list[str | None] = [None] * args.requests
        memory = {}
        for method in METHODS:
            loaded = load_model(model_dir, "bfloat16", torch.device(args.device), None, method)
            memory[method] = (loaded.weight_bytes, projection_bytes(loaded))
            del loaded
        for method in METHODS:  # warm-up (lazy initialisation, allocator) outside the timed runs
            run(make_core(model_dir, adapters, method, args.dtype, args.device), prompts[:2], mixed[:2], 2)
        rates: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for _ in range(args.repeats):
            for method in METHODS:
                for label, names in (("mixed", mixed), ("base", base)):
                    core = make_core(model_dir, adapters, method, args.dtype, args.device)
                    rates.setdefault((method, label), []).append(run(core, prompts, names, args.new_tokens))
        for method in METHODS:
            results[method] = {
                "weight_bytes_bf16": memory[method][0],
                "vs_bf16": memory[method][0] / memory["none"][0],
                "projections_vs_bf16": memory[method][1] / memory["none"][1],
            }
            for label in ("mixed", "base"):
                results[method][f"tok_s_{label}"] = max(r[0] for r in rates[(method, label)])
                results[method][f"tok_cpu_s_{label}"] = max(r[1] for r in rates[(method, label)])
        device = torch.device(args.device)
        dtype = getattr(torch, args.dtype)
        inter = -(-args.hidden * 8 // 3 // 64) * 64
        micro = {t: matmul_ms(2 * inter, args.hidden, t, dtype, device) for t in (1, 128)}
    ref = results["none"]
    print(
        f"model: hidden {args.hidden}, layers {args.layers}, vocab {args.vocab}; throughput served in {args.dtype} "
        f"on {args.device}, {args.threads} threads; {args.requests} requests x {args.new_tokens} new tokens"
    )
    print(
        "| base | weights in bf16, MiB | vs bf16: all weights | vs bf16: projections | tok/s mixed 8 LoRA "
        "(vs none) | tok/s base (vs none) | tok/CPU-s mixed (vs none) | tok/CPU-s base (vs none) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for method, r in results.items():
        cells = [
            f"{r[key]:.1f} ({r[key] / ref[key]:.2f})"
            for key in ("tok_s_mixed", "tok_s_base", "tok_cpu_s_mixed", "tok_cpu_s_base")
        ]
        print(
            f"| {method} | {r['weight_bytes_bf16'] / 2**20:.2f} | {r['vs_bf16']:.3f} | "
            f"{r['projections_vs_bf16']:.3f} | " + " | ".join(cells) + " |"
        )
    real = {name: nf4_ratio(shape) for name, shape in REAL_SHAPES.items()}
    for name, (whole, proj) in real.items():
        print(f"{name} shapes (analytic): NF4+DQ weights / bf16 = {whole:.3f} (projections alone {proj:.3f})")
    for t, row in micro.items():
        cells = ", ".join(f"{k} {v:.3f} ms ({v / row['none']:.2f}x)" for k, v in row.items())
        print(f"one gate_up projection [{2 * inter} x {args.hidden}], T={t}: {cells}")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "real_shapes": real, "matmul_ms": micro}, indent=1))


if __name__ == "__main__":
    main()
