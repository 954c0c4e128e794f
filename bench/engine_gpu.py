"""GPU: engine decode tokens/s at Llama-3-8B shapes with 0 / 1 / 8 / 64 distinct adapters, eager vs CUDA graphs.

Question answered: what do distinct adapters cost a decode step of the real engine (scheduler, context buffers,
LoRA backend, paged attention, sampling), and what do CUDA graphs save? Goals (issue 13): decode with <= 8
distinct adapters within 10% of base-only; 64 distinct within 1.3x of the bytes-bound step time.

Setup: Llama-3-8B shapes (hidden 4096, 32 layers, GQA 32/8, intermediate 14336, vocab 128256) with random bf16
weights made on the device (no checkpoint); synthetic adapters on all seven linear modules, ranks 8/16/32/64
cycled; ``--seqs`` sequences (default 64) with ``--prompt`` random prompt tokens each, request i using adapter
i mod n (n = 0: base model only). After every prompt is in, ``--steps`` decode steps of all sequences are timed
(``torch.cuda.synchronize`` + wall clock; every step also samples, which syncs). Modes: eager
(``enforce_eager``) and CUDA graphs (captured at engine start, one per batch-size bucket).

The bytes-bound step time = (base weights + the step's distinct adapters' rank-rows + KV read) / the device's
measured copy bandwidth; reported next to each row.

    python bench/engine_gpu.py [--steps 32] [--seqs 64] [--prompt 128] [--out FILE.md]
    python bench/engine_gpu.py --smoke          # tiny shapes on CPU (torch backend, eager): checks the script
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models

from loraplex.engine.adapters.host import HostAdapter
from loraplex.engine.adapters.types import ModuleLoRA
from loraplex.engine.config import EngineConfig
from loraplex.engine.core import EngineCore
from loraplex.engine.model.args import parse_model_args
from loraplex.engine.model.build import LoadedModel
from loraplex.engine.model.llama import CausalLM
from loraplex.engine.model.loader import ModelWeights, expected_shapes
from loraplex.engine.model.rope import RotaryTable
from loraplex.engine.request import GenerationRequest
from loraplex.engine.sampling import SamplingParams
from loraplex.registry.spec import ModelSpec

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANKS = (8, 16, 32, 64)
LLAMA3_8B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}
SMOKE = {**LLAMA3_8B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
SMOKE.update(num_attention_heads=4, num_key_value_heads=2, vocab_size=320, bos_token_id=0, eos_token_id=1)


def random_model(cfg: dict[str, Any], device: torch.device, dtype: torch.dtype, max_len: int) -> LoadedModel:
    """The engine's model with random weights made on the device (no checkpoint on disk)."""
    args = parse_model_args(cfg)
    gen = torch.Generator(device=device).manual_seed(0)
    weights = {}
    for name, shape in expected_shapes(args).items():
        if name.endswith("norm.weight"):
            weights[name] = torch.ones(shape, dtype=dtype, device=device)
        else:
            weights[name] = (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * 0.02).to(dtype)
    model = CausalLM(args, ModelWeights(weights, {}, "none", dtype), RotaryTable(args, max_len, device, dtype))
    del weights
    vocab = {f"w{i}": i for i in range(args.vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    return LoadedModel(args, ModelSpec.from_config(cfg), model, tokenizer, args.eos_token_ids, dtype, max_len)


def strip_lora(model: torch.nn.Module) -> None:
    """Undo ``apply_lora_transform`` so the next engine wraps the bare model again."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ in ("LoRALinear", "LoRAEmbedding", "LoRALMHead"):
                setattr(parent, name, child.base)


def adapters(loaded: LoadedModel, device: torch.device, count: int) -> dict[str, HostAdapter]:
    """``count`` adapters, ranks cycled; adapters of one rank share tensors (the pool copies them anyway)."""
    shapes = loaded.spec.module_shapes()
    by_rank: dict[int, HostAdapter] = {}
    for rank in RANKS:
        gen = torch.Generator(device=device).manual_seed(rank)
        modules = {}
        for layer in range(loaded.args.num_layers):
            for name in LINEAR:
                h_in, h_out = shapes[name]
                a = torch.randn(rank, h_in, generator=gen, device=device) * 0.02
                b = torch.randn(h_out, rank, generator=gen, device=device) * 0.02
                modules[(layer, name)] = ModuleLoRA(a=a.to(loaded.dtype), b=b.to(loaded.dtype), scale=2.0)
        by_rank[rank] = HostAdapter(modules=modules, rank=rank)
    return {f"a{i}": by_rank[RANKS[i % len(RANKS)]] for i in range(count)}


@dataclass
class Row:
    mode: str
    distinct: int
    tok_s: float
    step_ms: float
    bound_ms: float


def bytes_bound_ms(loaded: LoadedModel, distinct: int, seqs: int, context: int, gbps: float) -> float:
    """(base weights + distinct adapters' rank-rows + every sequence's K/V) / copy bandwidth."""
    element = torch.empty((), dtype=loaded.dtype).element_size()
    weights = sum(p.numel() for p in loaded.model.parameters()) * element
    shapes = loaded.spec.module_shapes()
    per_row = loaded.args.num_layers * sum(shapes[m][0] + shapes[m][1] for m in LINEAR) * element
    rows = sum(RANKS[i % len(RANKS)] for i in range(distinct))
    a = loaded.args
    kv = 2 * a.num_layers * seqs * context * a.num_kv_heads * a.head_dim * element
    return (weights + rows * per_row + kv) / (gbps * 1e9) * 1e3


def copy_gbps(device: torch.device) -> float:
    if device.type != "cuda":
        return 10.0  # a nominal figure: CPU smoke runs check the script, not the machine
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * src.numel() * 10 / (time.perf_counter() - start) / 1e9


def measure(core: EngineCore, distinct: int, args: argparse.Namespace, vocab: int, tag: str) -> float:
    """Seconds per decode step of ``args.seqs`` sequences (all prompts in first)."""
    gen = torch.Generator().manual_seed(distinct)
    for i in range(args.seqs):
        prompt = torch.randint(3, vocab, (args.prompt,), generator=gen).tolist()
        params = SamplingParams(max_new_tokens=args.steps + 4, ignore_eos=True)
        key = f"a{i % distinct}" if distinct else None
        core.add_request(GenerationRequest(f"{tag}-{distinct}-{i}", prompt, params, adapter_key=key))
    while any(s.num_pending > 1 for s in core.scheduler.running) or core.scheduler.waiting:
        core.step()
    for _ in range(2):  # first decode steps: warm caches (and, eagerly, Triton's autotuning)
        core.step()
    sync = torch.cuda.synchronize if core.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        core.step()
    sync()
    elapsed = (time.perf_counter() - start) / args.steps
    while core.has_work():
        core.step()
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the script runs")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--seqs", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--distinct", type=int, nargs="*", default=[0, 1, 8, 64])
    parser.add_argument("--modes", nargs="*", default=["eager", "graphs"], choices=["eager", "graphs"])
    parser.add_argument("--out", type=Path, help="write the table (Markdown) and rows (JSON beside it) here")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("bench/engine_gpu.py needs CUDA; use --smoke to check it on CPU", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    cfg = LLAMA3_8B if cuda else SMOKE
    if args.smoke:
        args.steps, args.seqs, args.prompt = min(args.steps, 3), min(args.seqs, 8), min(args.prompt, 8)
        args.modes = ["eager"]
    dtype = torch.bfloat16 if cuda else torch.float32
    max_len = args.prompt + args.steps + 16
    loaded = random_model(cfg, device, dtype, max_len)
    made = adapters(loaded, device, max(args.distinct))
    gbps = copy_gbps(device)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            config = EngineConfig(
                model_dir=tmp,
                device=device.type,
                dtype="bfloat16" if cuda else "float32",
                block_size=16,
                kv_cache_blocks=args.seqs * -(-max_len // 16) + 8,
                max_num_seqs=args.seqs,
                max_num_batched_tokens=max(1024, args.prompt),
                max_adapters_per_step=max(1, max(args.distinct)),
                max_lora_rank=max(RANKS),
                gpu_adapter_rows=max(max(RANKS), sum(RANKS[i % len(RANKS)] for i in range(max(args.distinct)))),
                max_model_len=max_len,
                lora_embeddings=False,
                enforce_eager=mode == "eager",
                host_adapter_bytes=1 << 40,  # the bench's adapters are made on the device: no host budget applies
            )
            start = time.perf_counter()
            core = EngineCore(config, loaded)
            for key, adapter in made.items():
                core.residency.add(key, adapter)
            print(f"[{mode}] engine ready in {time.perf_counter() - start:.1f} s (graph capture included)", flush=True)
            for distinct in args.distinct:
                seconds = measure(core, distinct, args, loaded.args.vocab_size, mode)
                bound = bytes_bound_ms(loaded, distinct, args.seqs, args.prompt + args.steps, gbps)
                row = Row(mode, distinct, args.seqs / seconds, seconds * 1e3, bound)
                rows.append(row)
                print(f"[{mode}] distinct={distinct:<3} {row.tok_s:9.1f} tok/s  step {row.step_ms:7.2f} ms", flush=True)
            del core
            strip_lora(loaded.model)
            if cuda:
                torch.cuda.empty_cache()
    table = render(rows, args, gbps, torch.cuda.get_device_name() if cuda else "cpu (smoke)")
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
        args.out.with_suffix(".json").write_text(json.dumps([vars(r) for r in rows], indent=2))
    return 0


def render(rows: list[Row], args: argparse.Namespace, gbps: float, device: str) -> str:
    base = {r.mode: r for r in rows if r.distinct == 0}
    eager = {r.distinct: r for r in rows if r.mode == "eager"}
    lines = [
        f"### Engine decode, {device}: {args.seqs} sequences, prompt {args.prompt}, {args.steps} timed steps; "
        f"copy bandwidth {gbps:.0f} GB/s",
        "",
        "| mode | distinct adapters | tok/s | step ms | x base-only step | bytes-bound ms | step / bound | "
        "graphs speedup |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = base.get(r.mode)
        vs_base = f"{r.step_ms / b.step_ms:.2f}" if b else "-"
        speedup = f"{eager[r.distinct].step_ms / r.step_ms:.2f}" if r.mode == "graphs" and r.distinct in eager else "-"
        lines.append(
            f"| {r.mode} | {r.distinct} | {r.tok_s:.1f} | {r.step_ms:.2f} | {vs_base} | {r.bound_ms:.2f} | "
            f"{r.step_ms / r.bound_ms:.2f} | {speedup} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
