"""Fairness between tenants under overload: who gets the engine when demand exceeds capacity?

Question answered (issue 11): with the engine saturated, does a light tenant keep its fair share and its latency
when a heavy tenant floods the same engine, and do many equal tenants get equal service?

Scenarios, each from the same engine (a self-started registry + CPU engine with a small random Llama, or
``--engine``/``--registry``), tenants = adapter namespaces (``t0/…``, ``t1/…``), Poisson arrivals:
  alone   the light tenant by itself at its rate (its TTFT baseline)
  10x     heavy (10x the light rate) and light together, both offering more than the engine serves
  8-way   8 tenants with equal rates, together above capacity
Served tokens are the output tokens each tenant received within the measurement window (from the first
arrival until the earliest time any tenant had no request left to send), so every tenant is backlogged
throughout. Reported: light share of served tokens (equal weights: fair = 50%), light TTFT p99 against alone,
and Jain's index (Σx)²/(n·Σx²) over the 8 tenants' served tokens (1 = perfectly equal). Measured, not asserted.

    .venv/bin/python bench/fairness.py --rate 4 --duration 30     # CPU-sized
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from loraplex.engine.v1 import engine_service_pb2 as epb
from loraplex.engine.v1 import engine_service_pb2_grpc as epb_grpc
from loraplex.registry.client import RegistryClient
from loraplex.registry.spec import ModelSpec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from registry_io import LINEAR, adapter_config_json, adapter_tensors, percentile, write_safetensors
from serve import Stack, start_stack


@dataclass(frozen=True)
class Sent:
    tenant: int
    at: float
    adapter: str
    prompt: list[int]
    max_new_tokens: int


@dataclass
class Received:
    tenant: int
    sent_at: float
    first_at: float | None
    token_times: list[float]
    error: str = ""


async def push_tenant_adapters(
    registry: str, base_model: str, tenants: int, per_tenant: int, work: Path
) -> list[list[str]]:
    refs: list[list[str]] = []
    async with RegistryClient(registry) as client:
        spec = ModelSpec.from_config(json.loads((await client.get_base_model(base_model)).config_json))
        run = f"{int(time.time()) % 100_000:05d}"
        for t in range(tenants):
            refs.append([])
            for i in range(per_tenant):
                path = work / "adapter.safetensors"
                write_safetensors(path, adapter_tensors(spec, 8, LINEAR), seed=1000 * t + i)
                name = f"t{t}r{run}/a{i}"
                await client.create_adapter(name, base_model)
                version = await client.upload(name, adapter_config_json(8, LINEAR, base_model), path.read_bytes())
                refs[t].append(f"{name}@{version.version}")
    return refs


def arrivals(rates: Sequence[float], refs: list[list[str]], args: argparse.Namespace, vocab: int) -> list[Sent]:
    rng = random.Random(args.seed)
    out: list[Sent] = []
    for tenant, rate in enumerate(rates):
        t = 0.0
        while True:
            t += rng.expovariate(rate)
            if t > args.duration:
                break
            prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(args.min_len, args.max_len))]
            out.append(Sent(tenant, t, rng.choice(refs[tenant]), prompt, rng.randint(args.min_len, args.max_len)))
    return sorted(out, key=lambda s: s.at)


async def send(stub: epb_grpc.EngineServiceStub, t0: float, sent: Sent, into: list[Received]) -> None:
    """Stream one request; its record is in ``into`` from the moment it is sent, so a request cancelled before
    its first token still counts (a scheduler that starves it must not look good for it)."""
    await asyncio.sleep(max(0.0, t0 + sent.at - time.perf_counter()))
    request = epb.GenerateStreamRequest(
        adapter=sent.adapter,
        token_ids=epb.TokenIds(ids=sent.prompt),
        stopping=epb.StoppingCriteria(max_new_tokens=sent.max_new_tokens, ignore_eos=True),
        response=epb.ResponseOptions(token_ids=True),
    )
    got = Received(sent.tenant, time.perf_counter() - t0, None, [])
    into.append(got)
    try:
        async for message in stub.GenerateStream(request, timeout=600):
            now = time.perf_counter() - t0
            if message.tokens and got.first_at is None:
                got.first_at = now
            got.token_times += [now] * len(message.tokens)
    except grpc.aio.AioRpcError as exc:
        got.error = exc.code().name


async def scenario(stub: epb_grpc.EngineServiceStub, plan: list[Sent], tenants: int, grace: float) -> dict[str, Any]:
    """Send ``plan``; requests still running ``grace`` seconds after the last arrival are cancelled (an overload
    backlog would otherwise take minutes to drain on a CPU)."""
    t0 = time.perf_counter() + 0.05
    results: list[Received] = []
    tasks = [asyncio.create_task(send(stub, t0, s, results)) for s in plan]
    _, pending = await asyncio.wait(tasks, timeout=max(s.at for s in plan) + grace)
    cancelled_at = time.perf_counter() - t0
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    last_send = [max((s.at for s in plan if s.tenant == t), default=0.0) for t in range(tenants)]
    window = min(last_send)  # every tenant still had requests to send until here: all backlogged
    served = [sum(1 for r in results if r.tenant == t for at in r.token_times if at <= window) for t in range(tenants)]
    # a request cancelled before its first token counts with the time it had waited (a lower bound)
    ttft = [
        [((r.first_at or cancelled_at) - r.sent_at) * 1000 for r in results if r.tenant == t] for t in range(tenants)
    ]
    return {
        "window_s": window,
        "served_tokens": served,
        "ttft_p50_ms": [percentile(x, 50) if x else float("nan") for x in ttft],
        "ttft_p99_ms": [percentile(x, 99) if x else float("nan") for x in ttft],
        "requests": [sum(1 for s in plan if s.tenant == t) for t in range(tenants)],
        "no_first_token": [sum(1 for r in results if r.tenant == t and r.first_at is None) for t in range(tenants)],
        "errors": sum(1 for r in results if r.error),
    }


def jain(values: Sequence[float]) -> float:
    total = sum(values)
    squares = sum(v * v for v in values)
    return total * total / (len(values) * squares) if squares else float("nan")


async def bench(args: argparse.Namespace, stack: Stack, work: Path) -> dict[str, Any]:
    channel = grpc.aio.insecure_channel(stack.engine, options=[("grpc.max_concurrent_streams", 10_000)])
    stub = epb_grpc.EngineServiceStub(channel)
    info = await stub.GetModelInfo(epb.GetModelInfoRequest())
    refs = await push_tenant_adapters(stack.registry, info.base_model, 8, args.adapters_per_tenant, work)
    light = args.rate
    g = args.grace
    await scenario(stub, arrivals([light] * 8, refs, args, info.vocab_size), 8, g)  # warm-up: every adapter loaded
    alone = await scenario(stub, arrivals([light], refs[:1], args, info.vocab_size), 1, g)
    pair = await scenario(stub, arrivals([light, 10 * light], refs[:2], args, info.vocab_size), 2, g)
    eight = await scenario(stub, arrivals([light] * 8, refs, args, info.vocab_size), 8, g)
    await channel.close(None)
    share = pair["served_tokens"][0] / max(1, sum(pair["served_tokens"]))
    ttft_ratio = pair["ttft_p99_ms"][0] / alone["ttft_p99_ms"][0]
    index = jain(eight["served_tokens"])
    print("| scenario | served tokens | TTFT p50 ms | TTFT p99 ms | figure |\n|---|---|---|---|---|")
    a50, a99, p50, p99 = alone["ttft_p50_ms"], alone["ttft_p99_ms"], pair["ttft_p50_ms"], pair["ttft_p99_ms"]
    print(f"| light alone | {alone['served_tokens']} | {a50[0]:.0f} | {a99[0]:.0f} | |")
    print(
        f"| light + heavy (10x) | {pair['served_tokens']} | {p50[0]:.0f} / {p50[1]:.0f} | {p99[0]:.0f} / {p99[1]:.0f} "
        f"| light share {share:.1%}; light TTFT p99 {ttft_ratio:.2f}x alone; cancelled before a first token "
        f"(light/heavy): {pair['no_first_token'][0]}/{pair['no_first_token'][1]} |"
    )
    print(f"| 8 equal tenants | {eight['served_tokens']} | | | Jain's index {index:.3f} |")
    return {
        "alone": alone,
        "pair": pair,
        "eight": eight,
        "light_share": share,
        "ttft_ratio": ttft_ratio,
        "jain": index,
        "args": vars(args),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--engine", default=None)
    parser.add_argument("--registry", default=None)
    parser.add_argument("--rate", type=float, default=4.0, help="the light tenant's arrivals per second")
    parser.add_argument("--duration", type=float, default=30.0, help="arrival window per scenario, seconds")
    parser.add_argument("--min-len", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=48)
    parser.add_argument("--adapters-per-tenant", type=int, default=4)
    parser.add_argument("--grace", type=float, default=5.0, help="seconds after the last arrival before cancelling")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--max-adapters-per-batch", type=int, default=64)
    parser.add_argument("--gpu-adapter-bytes", type=int, default=None, help="self-started engine: pool budget")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    args.ranks = [8]
    with tempfile.TemporaryDirectory(prefix="loraplex-bench-fair-") as tmp:
        work = Path(tmp)
        stack = Stack(args.engine, args.registry, None) if args.engine else start_stack(args, work)
        try:
            report = asyncio.run(bench(args, stack, work))
        finally:
            stack.stop()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
