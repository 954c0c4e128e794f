"""How close are the Triton multi-LoRA kernels (and paged decode attention) to the memory-bandwidth bound?

One command, one run, every ratio against baselines measured in the same process:

    python bench/lora_kernels.py                       # CUDA: Llama-3-8B shapes, prints tables, writes JSON
    python bench/lora_kernels.py --smoke               # tiny shapes; on CPU via TRITON_INTERPRET=1

Questions answered (decode: T = B tokens, one per sequence, adapter of token i = i mod n):
 1. bandwidth efficiency = bytes-bound time / measured time, with
    bytes = 2·[Σ_adapters r·Σ_slices(h_in + h_out) + T·(h_in + 2·Σ h_out)] (the brief's 2·[n·r·(h_in+h_out) +
    T·(h_in+2·h_out)] summed over the slices of a fused module) and the device's measured copy bandwidth;
 2. speedup vs torch gather-bmm and vs a per-adapter loop;
 3. mixed ranks {8,16,32,64} vs uniform at the mean rank vs everything padded to 64;
 4. distinct-adapter penalty t(n=B)/t(n=1) vs the bytes formula's prediction;
 5. paged decode attention vs PyTorch SDPA on already-gathered KV (and gather + SDPA).
Every timed callable is captured in a CUDA graph over a rotating pool of argument sets (weights, inputs and
outputs) large enough to defeat L2, so the numbers are steady-state HBM numbers without launch overhead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

Fn = Callable[[], None]


@dataclass(frozen=True)
class Module:
    """A (possibly fused) target module: one input width, one output width per slice."""

    name: str
    h_in: int
    h_outs: tuple[int, ...]


FULL_MODULES = (
    Module("qkv", 4096, (4096, 1024, 1024)),
    Module("o", 4096, (4096,)),
    Module("gate_up", 4096, (14336, 14336)),
    Module("down", 14336, (4096,)),
)
SMOKE_MODULES = (Module("qkv_tiny", 32, (32, 16, 16)), Module("down_tiny", 48, (32,)))
MIXED_RANKS = (8, 16, 32, 64)
SMOKE_MIXED_RANKS = (2, 4, 6, 8)  # the interpreter's cost grows with the rank: keep --smoke to seconds


@dataclass
class Env:
    """What a run needs to know about where it runs."""

    device: torch.device
    dtype: torch.dtype
    graphs: bool
    reps: int
    rotate_bytes: int
    copy_gbps: float = 0.0
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    json_path: Path | None = None
    md_path: Path | None = None
    loop_max: int = 64  # the per-adapter loop baseline is timed up to this many distinct adapters

    def save(self) -> None:
        """Write every row so far (JSON and Markdown): a run cut short by a time limit keeps what it measured."""
        if self.json_path is not None:
            self.json_path.parent.mkdir(parents=True, exist_ok=True)
            self.json_path.write_text(json.dumps({**self.meta, **self.rows}, indent=2))
        if self.md_path is not None:
            self.md_path.parent.mkdir(parents=True, exist_ok=True)
            self.md_path.write_text(markdown(self))


@dataclass
class LoraArgs:
    """One argument set: a contiguous rank-exact pool per slice, a decode batch, x and out."""

    x: torch.Tensor
    out: torch.Tensor
    batch: Any  # LoRABatch
    slices: list[Any]  # LoRASlice
    token_slot: torch.Tensor  # long [T], for the baselines
    groups: list[torch.Tensor]  # per adapter: its token indices, for the per-adapter loop
    ranks: list[int]


# ----------------------------------------------------------------------------------------------- timing


def measure(env: Env, fns: Sequence[Fn]) -> float:
    """Microseconds per call of one callable, averaged over the rotating argument sets ``fns``."""
    for fn in fns:  # warm-up outside capture: autotuning, pointer tables, allocator pools
        fn()
    if env.device.type != "cuda":
        start = time.perf_counter()
        for _ in range(env.reps):
            for fn in fns:
                fn()
        return (time.perf_counter() - start) * 1e6 / (env.reps * len(fns))
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    begin = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    torch.cuda.synchronize()
    begin.record()
    for _ in range(env.reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return float(begin.elapsed_time(end)) * 1e3 / (env.reps * len(fns))


def copy_bandwidth(env: Env) -> float:
    """Device copy bandwidth in GB/s (read + write), the denominator of every bytes-bound time."""
    numel = (1 << 28) if env.device.type == "cuda" else (1 << 22)
    src = torch.empty(numel, dtype=torch.uint8, device=env.device)
    dst = torch.empty_like(src)

    def run() -> None:
        dst.copy_(src)

    us = measure(env, [run])
    return 2 * numel / (us * 1e-6) / 1e9


def copies_for(env: Env, bytes_per_set: int) -> int:
    """How many argument sets rotate so that one pass over them cannot live in L2."""
    return max(2, min(64, math.ceil(env.rotate_bytes / max(1, bytes_per_set))))


# ----------------------------------------------------------------------------------------------- LoRA cases


def lora_bytes(module: Module, ranks: Sequence[int], tokens: int) -> int:
    weights = sum(ranks) * sum(module.h_in + h for h in module.h_outs)
    return 2 * (weights + tokens * (module.h_in + 2 * sum(module.h_outs)))


def build_args(env: Env, module: Module, tokens: int, ranks: Sequence[int], gen: torch.Generator) -> LoraArgs:
    from loraplex.kernels.types import LoRABatch, LoRAModuleWeights, LoRASlice

    n, dev, dtype = len(ranks), env.device, env.dtype
    max_rank = max(ranks)
    starts = [sum(ranks[:s]) for s in range(n)]
    table = torch.zeros(n, max_rank, dtype=torch.int32)
    for s, (start, r) in enumerate(zip(starts, ranks, strict=True)):
        table[s, :r] = torch.arange(start, start + r, dtype=torch.int32)
    slices, offset = [], 0
    for h_out in module.h_outs:
        w = LoRAModuleWeights(
            a_rows=(torch.randn(sum(ranks), module.h_in, generator=gen) * 0.02).to(dtype).to(dev),
            b_rows=(torch.randn(sum(ranks), h_out, generator=gen) * 0.02).to(dtype).to(dev),
            row_table=table.to(dev),
            ranks=torch.tensor(list(ranks), dtype=torch.int32, device=dev),
            scales=torch.full((n,), 0.5, device=dev),
        )
        slices.append(LoRASlice(w, offset))
        offset += h_out
    token_slots = [t % n for t in range(tokens)]
    return LoraArgs(
        x=torch.randn(tokens, module.h_in, generator=gen).to(dtype).to(dev),
        out=torch.zeros(tokens, offset, dtype=dtype, device=dev),
        batch=LoRABatch.from_slots(token_slots, device=dev),
        slices=slices,
        token_slot=torch.tensor(token_slots, dtype=torch.long, device=dev),
        groups=[torch.tensor([t for t in range(tokens) if t % n == s], device=dev) for s in range(n)],
        ranks=list(ranks),
    )


def triton_fn(a: LoraArgs) -> Fn:
    from loraplex.kernels import triton_lora

    return lambda: triton_lora.apply_lora(a.x, a.out, a.batch, a.slices)


def gather_bmm_fn(a: LoraArgs) -> Fn:
    """Baseline: gather every token's A and B (uniform rank), two batched matmuls per slice."""
    r, n = a.ranks[0], len(a.ranks)

    def run() -> None:
        for s in a.slices:
            w = s.weights
            h_out = w.b_rows.shape[1]
            a_tok = w.a_rows.view(n, r, -1)[a.token_slot]  # [T, r, h_in]
            b_tok = w.b_rows.view(n, r, h_out)[a.token_slot]  # [T, r, h_out]
            y = torch.bmm(a_tok, a.x.unsqueeze(-1)).transpose(1, 2)  # [T, 1, r]
            delta = torch.bmm(y, b_tok).squeeze(1) * w.scales[a.token_slot, None]
            a.out[:, s.out_offset : s.out_offset + h_out] += delta.to(a.out.dtype)

    return run


def loop_fn(a: LoraArgs) -> Fn:
    """Baseline: one pair of matmuls per adapter and slice over that adapter's tokens."""
    r = a.ranks[0]

    def run() -> None:
        for s in a.slices:
            w = s.weights
            h_out = w.b_rows.shape[1]
            cols = slice(s.out_offset, s.out_offset + h_out)
            for slot, idx in enumerate(a.groups):
                rows = slice(slot * r, (slot + 1) * r)
                delta = (a.x[idx] @ w.a_rows[rows].T) @ w.b_rows[rows] * w.scales[slot]
                a.out[idx, cols] += delta

    return run


def check(a: LoraArgs) -> float:
    """Max |triton - reference| on a fresh output: every timed case is also a correctness case."""
    from loraplex.kernels import reference, triton_lora

    got = torch.zeros_like(a.out)
    triton_lora.apply_lora(a.x, got, a.batch, a.slices)
    want = torch.zeros_like(a.out)
    for s in a.slices:
        y = torch.zeros(a.x.shape[0], s.weights.max_rank, dtype=torch.float32, device=a.x.device)
        reference.lora_shrink_ref(a.x, a.batch, s.weights, y)
        reference.lora_expand_ref(y, a.batch, s.weights, want, s.out_offset)
    return float((got.float() - want.float()).abs().max())


def time_lora(env: Env, module: Module, tokens: int, ranks: Sequence[int], baselines: bool) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(tokens * 7 + len(ranks))
    nbytes = lora_bytes(module, ranks, tokens)
    sets = [build_args(env, module, tokens, ranks, gen) for _ in range(copies_for(env, nbytes))]
    row: dict[str, Any] = {"max_abs_err": check(sets[0]), "bytes": nbytes}
    row["triton_us"] = measure(env, [triton_fn(a) for a in sets])
    if baselines:
        row["gather_bmm_us"] = measure(env, [gather_bmm_fn(a) for a in sets])
        if len(ranks) <= env.loop_max:
            row["loop_us"] = measure(env, [loop_fn(a) for a in sets])
    row["bound_us"] = nbytes / (env.copy_gbps * 1e9) * 1e6
    row["bw_eff"] = row["bound_us"] / row["triton_us"]
    del sets
    if env.device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def distinct_counts(batch: int) -> list[int]:
    return sorted({1, max(1, batch // 8), batch})


def run_lora(
    env: Env, modules: Sequence[Module], batches: Sequence[int], ranks: Sequence[int], mixed_ranks: Sequence[int]
) -> None:
    main, penalty, mixed = env.rows["lora"], env.rows["penalty"], env.rows["mixed_ranks"]
    for module in modules:
        for b in batches:
            for r in ranks:
                by_n: dict[int, dict[str, Any]] = {}
                for n in distinct_counts(b):
                    row = time_lora(env, module, b, [r] * n, baselines=True)
                    row.update(module=module.name, B=b, n=n, r=r)
                    by_n[n] = row
                    main.append(row)
                    print_row("lora", row)
                    env.save()
                if b > 1:
                    p = {
                        "module": module.name,
                        "B": b,
                        "r": r,
                        "penalty": by_n[b]["triton_us"] / by_n[1]["triton_us"],
                        "predicted": by_n[b]["bytes"] / by_n[1]["bytes"],
                    }
                    penalty.append(p)
                    print_row("penalty", p)
                    env.save()
            if b >= 8 or (b >= len(mixed_ranks) and module is modules[0]):  # --smoke: B = 4, first module only
                cycle = [mixed_ranks[i % len(mixed_ranks)] for i in range(b)]
                mean = round(sum(cycle) / len(cycle))
                t = {
                    "mixed": time_lora(env, module, b, cycle, baselines=False)["triton_us"],
                    "uniform_mean": time_lora(env, module, b, [mean] * b, baselines=False)["triton_us"],
                    "padded_max": time_lora(env, module, b, [max(cycle)] * b, baselines=False)["triton_us"],
                }
                m = {"module": module.name, "B": b, "n": b, "mean_rank": mean}
                m.update({f"{k}_us": v for k, v in t.items()})
                mixed.append(m)
                print_row("mixed", m)
                env.save()


# ----------------------------------------------------------------------------------------------- attention


@dataclass(frozen=True)
class PagedSet:
    """One attention argument set: the paged cache plus the same history gathered dense for SDPA."""

    q: torch.Tensor  # [B, H, D]
    k: torch.Tensor  # [num_blocks, block, n_kv, D]
    v: torch.Tensor
    table: torch.Tensor  # int32 [B, blocks]
    lens: torch.Tensor  # int32 [B]
    dense_k: torch.Tensor  # [B, n_kv, ctx, D]
    dense_v: torch.Tensor
    ctx: int


def build_paged(env: Env, b: int, ctx: int, heads: tuple[int, int, int], gen: torch.Generator) -> PagedSet:
    n_heads, n_kv, head_dim = heads
    block = 16
    blocks = math.ceil(ctx / block)
    dev = env.device
    k = torch.randn(b * blocks, block, n_kv, head_dim, generator=gen).to(env.dtype).to(dev)
    v = torch.randn(b * blocks, block, n_kv, head_dim, generator=gen).to(env.dtype).to(dev)
    table = torch.randperm(b * blocks, generator=gen).view(b, blocks).to(torch.int32).to(dev)

    def dense(cache: torch.Tensor) -> torch.Tensor:
        return cache[table.long()].reshape(b, blocks * block, n_kv, head_dim)[:, :ctx].transpose(1, 2).contiguous()

    return PagedSet(
        q=torch.randn(b, n_heads, head_dim, generator=gen).to(env.dtype).to(dev),
        k=k,
        v=v,
        table=table,
        lens=torch.full((b,), ctx, dtype=torch.int32, device=dev),
        dense_k=dense(k),
        dense_v=dense(v),
        ctx=ctx,
    )


def paged_fn(s: PagedSet) -> Fn:
    from loraplex.kernels.triton_attention import paged_attention_decode

    scale = s.q.shape[-1] ** -0.5

    def run() -> None:
        paged_attention_decode(s.q, s.k, s.v, s.table, s.lens, scale)

    return run


def sdpa_fn(s: PagedSet, gather: bool) -> Fn:
    """PyTorch SDPA (GQA) on the dense history; with ``gather`` the page gather is part of the timed work."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    q = s.q.unsqueeze(2)  # [B, H, 1, D]
    b, n_kv, head_dim = s.q.shape[0], s.k.shape[2], s.q.shape[2]
    idx = s.table.long()

    def dense() -> None:
        sdpa(q, s.dense_k, s.dense_v, enable_gqa=True)

    def gathered() -> None:
        k = s.k[idx].reshape(b, -1, n_kv, head_dim)[:, : s.ctx].transpose(1, 2)
        v = s.v[idx].reshape(b, -1, n_kv, head_dim)[:, : s.ctx].transpose(1, 2)
        sdpa(q, k, v, enable_gqa=True)

    return gathered if gather else dense


def run_attention(env: Env, batches: Sequence[int], contexts: Sequence[int], heads: tuple[int, int, int]) -> None:
    from loraplex.kernels.reference import paged_attention_decode_ref
    from loraplex.kernels.triton_attention import paged_attention_decode

    _, n_kv, head_dim = heads
    for b in batches:
        for ctx in contexts:
            gen = torch.Generator().manual_seed(b + ctx)
            kv_bytes = 2 * 2 * b * ctx * n_kv * head_dim  # K and V, 2 bytes each
            sets = [build_paged(env, b, ctx, heads, gen) for _ in range(copies_for(env, kv_bytes))]
            s, scale = sets[0], head_dim**-0.5
            got = paged_attention_decode(s.q, s.k, s.v, s.table, s.lens, scale).float()
            want = paged_attention_decode_ref(s.q, s.k, s.v, s.table, s.lens, scale).float()
            row: dict[str, Any] = {"B": b, "ctx": ctx, "max_abs_err": float((got - want).abs().max())}
            row["bytes"] = kv_bytes
            row["triton_us"] = measure(env, [paged_fn(x) for x in sets])
            row["sdpa_us"] = measure(env, [sdpa_fn(x, gather=False) for x in sets])
            row["gather_sdpa_us"] = measure(env, [sdpa_fn(x, gather=True) for x in sets])
            row["bound_us"] = kv_bytes / (env.copy_gbps * 1e9) * 1e6
            row["bw_eff"] = row["bound_us"] / row["triton_us"]
            env.rows["attention"].append(row)
            print_row("attention", row)
            env.save()
            del sets, s


# ----------------------------------------------------------------------------------------------- output


def print_row(kind: str, row: dict[str, Any]) -> None:
    if kind == "lora":
        extra = ""
        if "gather_bmm_us" in row:
            extra = f"  vs gather-bmm {row['gather_bmm_us'] / row['triton_us']:6.2f}x"
        if "loop_us" in row:
            extra += f"  vs loop {row['loop_us'] / row['triton_us']:6.2f}x"
        print(
            f"[lora] {row['module']:>9} B={row['B']:<4} n={row['n']:<4} r={row['r']:<3}"
            f" triton {row['triton_us']:9.1f}us  bound {row['bound_us']:8.1f}us  eff {row['bw_eff']:5.2f}"
            f"{extra}  err {row['max_abs_err']:.1e}"
        )
    elif kind == "penalty":
        print(
            f"[distinct-adapter penalty] {row['module']:>9} B={row['B']:<4} r={row['r']:<3}"
            f" t(n=B)/t(n=1) {row['penalty']:6.2f}  bytes predict {row['predicted']:6.2f}"
        )
    elif kind == "mixed":
        print(
            f"[mixed ranks] {row['module']:>9} B=n={row['B']:<4} mixed {row['mixed_us']:8.1f}us"
            f"  uniform r={row['mean_rank']} {row['uniform_mean_us']:8.1f}us"
            f"  padded to max {row['padded_max_us']:8.1f}us"
            f"  mixed/uniform {row['mixed_us'] / row['uniform_mean_us']:5.2f}"
            f"  padded/mixed {row['padded_max_us'] / row['mixed_us']:5.2f}"
        )
    else:
        print(
            f"[paged decode] B={row['B']:<4} ctx={row['ctx']:<6} triton {row['triton_us']:8.1f}us"
            f"  sdpa(gathered) {row['sdpa_us']:8.1f}us  gather+sdpa {row['gather_sdpa_us']:8.1f}us"
            f"  eff {row['bw_eff']:5.2f}  err {row['max_abs_err']:.1e}"
        )
    sys.stdout.flush()


def markdown(env: Env) -> str:
    """The four tables (plus attention) of this run, with the issue's goals next to the measured ratios."""
    meta = env.meta
    out = [f"### LoRA kernels, {meta.get('device')} ({meta.get('dtype')}), copy bandwidth {env.copy_gbps:.0f} GB/s", ""]
    out += [
        "Bandwidth efficiency (goal >= 0.70 at B in {16, 64, 256}, n = B) and speedups (goal >= 5x gather-bmm):",
        "",
        "| module | B | n | r | triton us | bound us | efficiency | vs gather-bmm | vs per-adapter loop | max err |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in env.rows["lora"]:
        gb = f"{r['gather_bmm_us'] / r['triton_us']:.2f}x" if "gather_bmm_us" in r else "-"
        lp = f"{r['loop_us'] / r['triton_us']:.2f}x" if "loop_us" in r else "-"
        out.append(
            f"| {r['module']} | {r['B']} | {r['n']} | {r['r']} | {r['triton_us']:.1f} | {r['bound_us']:.1f} | "
            f"{r['bw_eff']:.2f} | {gb} | {lp} | {r['max_abs_err']:.1e} |"
        )
    out += ["", "Distinct-adapter penalty t(n=B)/t(n=1) vs the bytes prediction:", ""]
    out += ["| module | B | r | penalty | bytes predict |", "|---|---|---|---|---|"]
    for p in env.rows["penalty"]:
        out.append(f"| {p['module']} | {p['B']} | {p['r']} | {p['penalty']:.2f} | {p['predicted']:.2f} |")
    out += ["", "Mixed ranks (8/16/32/64 cycled) vs uniform at the mean rank (goal <= 1.1x) vs all padded:", ""]
    out += ["| module | B = n | mixed us | uniform us | padded us | mixed / uniform | padded / mixed |"]
    out += ["|---|---|---|---|---|---|---|"]
    for m in env.rows["mixed_ranks"]:
        out.append(
            f"| {m['module']} | {m['B']} | {m['mixed_us']:.1f} | {m['uniform_mean_us']:.1f} | {m['padded_max_us']:.1f}"
            f" | {m['mixed_us'] / m['uniform_mean_us']:.2f} | {m['padded_max_us'] / m['mixed_us']:.2f} |"
        )
    out += ["", "Paged decode attention vs SDPA on gathered KV (lower bound) and gather + SDPA:", ""]
    out += ["| B | context | triton us | sdpa us | gather+sdpa us | efficiency | max err |"]
    out += ["|---|---|---|---|---|---|---|"]
    for a in env.rows["attention"]:
        out.append(
            f"| {a['B']} | {a['ctx']} | {a['triton_us']:.1f} | {a['sdpa_us']:.1f} | {a['gather_sdpa_us']:.1f} | "
            f"{a['bw_eff']:.2f} | {a['max_abs_err']:.1e} |"
        )
    return "\n".join(out) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU via TRITON_INTERPRET=1 if no GPU)")
    parser.add_argument("--json", type=Path, default=Path("bench/lora_kernels.json"), help="where to write rows")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--modules", nargs="*", help="subset of module names (default: all)")
    parser.add_argument("--batches", nargs="*", type=int, help="subset of B (default: 1 16 64 256)")
    parser.add_argument("--reps", type=int, default=20, help="graph replays per measurement")
    parser.add_argument("--skip-attention", action="store_true")
    parser.add_argument("--md", type=Path, help="also write the tables as Markdown here")
    parser.add_argument("--loop-max", type=int, default=64, help="time the per-adapter loop up to this many adapters")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print(
            "bench/lora_kernels.py needs a CUDA device (none found). "
            "Run `python bench/lora_kernels.py --smoke` to execute tiny shapes on CPU through TRITON_INTERPRET=1.",
            file=sys.stderr,
        )
        return 2
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"  # before the first triton import (the kernel modules import it)
    env = Env(
        device=torch.device("cuda" if cuda else "cpu"),
        dtype=getattr(torch, args.dtype),
        graphs=cuda,
        reps=args.reps if not args.smoke else 1,
        rotate_bytes=(150 << 20) if cuda else 0,
        rows={"lora": [], "penalty": [], "mixed_ranks": [], "attention": []},
        json_path=args.json,
        md_path=args.md,
        loop_max=args.loop_max,
    )
    pool = SMOKE_MODULES if args.smoke else FULL_MODULES
    modules = [m for m in pool if not args.modules or m.name in args.modules]
    batches = args.batches or ([4] if args.smoke else [1, 16, 64, 256])
    ranks = [4] if args.smoke else [16, 64]
    env.copy_gbps = copy_bandwidth(env)
    device_name = torch.cuda.get_device_name() if cuda else "cpu (TRITON_INTERPRET=1)"
    print(f"device: {device_name}   dtype: {args.dtype}   copy bandwidth: {env.copy_gbps:.0f} GB/s")
    env.meta = {
        "device": device_name,
        "dtype": args.dtype,
        "copy_gbps": env.copy_gbps,
        "smoke": args.smoke,
        "cuda_graphs": env.graphs,
    }
    if not args.skip_attention:  # first: the short section, so a time limit cuts the long LoRA one instead
        heads = (8, 2, 16) if args.smoke else (32, 8, 128)
        contexts = [40] if args.smoke else [512, 2048, 8192]
        run_attention(env, [2] if args.smoke else batches, contexts, heads)
    run_lora(env, modules, batches, ranks, SMOKE_MIXED_RANKS if args.smoke else MIXED_RANKS)
    env.save()
    print(f"wrote {args.json}" + (f" and {args.md}" if args.md else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
