"""Serving load generator: S-LoRA-style multi-adapter workloads over gRPC ``GenerateStream``, against the same
engine serving the base model only, in one run.

Question answered: what do many adapters cost an engine under open-loop load? For N adapters (1, 8, 64, 512)
and four popularity laws it sends Poisson arrivals at ``--rate`` with input and output lengths drawn uniformly
from ``--min-len``..``--max-len`` (S-LoRA's 8..512; shrink ``--max-len`` on CPU) and reports output tokens/s,
TTFT p50/p99, inter-token latency p50/p99 and cold adapter loads by tier (from the engine's Prometheus histogram
``loraplex_adapter_load_seconds``). Every scenario replays the same seeded arrivals and lengths as the base-only
run, so the ratios compare like with like. Adapters are evicted between scenarios so each one starts cold.

Popularity (request i of ``--requests``, adapters 0..N-1):
  distinct   adapter i mod N (round robin: consecutive requests never share an adapter while N > 1)
  uniform    i.i.d. uniform over the N adapters
  zipf       i.i.d. with P(k) ∝ 1/(k+1)^1.0 (a few hot adapters, a long cold tail)
  identical  adapter 0 for every request

Without ``--engine`` it starts its own registry (SQLite + local blobs) and engine (CPU) as subprocesses with a
small random Llama built by ``loraplex.services.demo_assets``, and synthesizes PEFT-format adapters directly
(correct PEFT key names, random fp16; PEFT itself is too slow for 512). With ``--engine`` it pushes the
adapters to ``--registry`` for the engine's base model (shapes from the registry's record) and reads metrics
from ``--metrics-url`` when given. Loopback only; bounded by ``--requests`` and ``--duration`` per scenario.

    .venv/bin/python bench/serve.py --max-len 64 --requests 48 --rate 6          # CPU-sized
    .venv/bin/python bench/serve.py --engine H:P --registry H:P --metrics-url http://H:M/metrics
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc

from loraplex.engine.v1 import engine_service_pb2 as epb
from loraplex.engine.v1 import engine_service_pb2_grpc as epb_grpc
from loraplex.registry.client import RegistryClient
from loraplex.registry.spec import ModelSpec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import small_llama
from registry_io import LINEAR, adapter_config_json, adapter_tensors, percentile, write_safetensors

POPULARITY = ("distinct", "uniform", "zipf", "identical")
PORT_LINE = re.compile(r"listening on port (\d+)")
METRICS_LINE = re.compile(r"metrics on port (\d+)")
LOAD_METRIC = "loraplex_adapter_load_seconds"
BASE_MODEL = "bench-serve"
N = TypeVar("N", int, float)
ADAPTER_NS = "bench"


# ------------------------------------------------------------------------------------------ stack


@dataclass
class Proc:
    """A ``loraplex`` server subprocess whose output is pumped into memory (for port lines and errors)."""

    popen: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    def wait_for(self, pattern: re.Pattern[str], timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if m := pattern.search(line):
                    return int(m.group(1))
            if self.popen.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise SystemExit("server did not come up:\n" + "".join(self.lines[-40:]))

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def spawn(args: Sequence[str]) -> Proc:
    exe = str(Path(sys.executable).parent / "loraplex")
    popen = subprocess.Popen([exe, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = Proc(popen)

    def pump() -> None:
        assert popen.stdout is not None
        for line in popen.stdout:
            proc.lines.append(line)

    threading.Thread(target=pump, daemon=True).start()
    return proc


@dataclass
class Stack:
    engine: str
    registry: str
    metrics_url: str | None
    procs: list[Proc] = field(default_factory=list)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


def start_stack(args: argparse.Namespace, work: Path) -> Stack:
    """Registry + engine subprocesses on loopback with a small random Llama (built here, on CPU)."""
    model_dir = small_llama(work / "model", args.hidden, args.layers, max(256, 2 * args.max_len + 16))
    reg = spawn(
        [
            *("registry", "serve", "--listen", "127.0.0.1:0", "--db", f"sqlite:///{work}/registry.db"),
            *("--blobs", f"file://{work}/blobs", "--log-level", "warning"),
        ]
    )
    reg_port = reg.wait_for(PORT_LINE, 60)
    registry = f"127.0.0.1:{reg_port}"
    asyncio.run(_register(registry, (model_dir / "config.json").read_text()))
    eng = spawn(
        [
            *("engine", "serve", "--model", str(model_dir), "--base-model", BASE_MODEL, "--registry", registry),
            *("--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--metrics-port", "0"),
            *("--log-level", "warning", "--dtype", "float32"),
            *("--max-num-seqs", str(args.max_num_seqs), "--max-lora-rank", str(max(args.ranks))),
            *("--max-adapters-per-batch", str(args.max_adapters_per_batch)),
            *(("--gpu-adapter-bytes", str(args.gpu_adapter_bytes)) if args.gpu_adapter_bytes else ()),
        ]
    )
    port = eng.wait_for(PORT_LINE, 300)
    metrics = eng.wait_for(METRICS_LINE, 5)
    return Stack(f"127.0.0.1:{port}", registry, f"http://127.0.0.1:{metrics}/metrics", [eng, reg])


async def _register(registry: str, config_json: str) -> None:
    async with RegistryClient(registry) as client:
        await client.register_base_model(BASE_MODEL, config_json)


# ------------------------------------------------------------------------------------------ adapters


async def push_adapters(
    registry: str, base_model: str, count: int, ranks: Sequence[int], work: Path
) -> tuple[list[str], float]:
    """Synthesize ``count`` PEFT-format adapters for ``base_model`` and upload them; returns refs and seconds."""
    started = time.perf_counter()
    refs: list[str] = []
    async with RegistryClient(registry) as client:
        spec = ModelSpec.from_config(json.loads((await client.get_base_model(base_model)).config_json))
        run_id = f"{int(time.time()) % 100_000:05d}"
        for i in range(count):
            rank = ranks[i % len(ranks)]
            path = work / "adapter.safetensors"
            write_safetensors(path, adapter_tensors(spec, rank, LINEAR), seed=i)
            name = f"{ADAPTER_NS}/r{run_id}-a{i:04d}"
            await client.create_adapter(name, base_model)
            version = await client.upload(name, adapter_config_json(rank, LINEAR, base_model), path.read_bytes())
            refs.append(f"{name}@{version.version}")
    return refs, time.perf_counter() - started


async def evict_all(stub: epb_grpc.EngineServiceStub) -> int:
    """Drop every resident adapter so the next scenario starts cold (needs admin scope; auth off locally)."""
    resident = await stub.ListResidentAdapters(epb.ListResidentAdaptersRequest())
    for entry in resident.adapters:
        await stub.EvictAdapter(epb.EvictAdapterRequest(adapter=f"{entry.adapter}@{entry.digest}"))
    return len(resident.adapters)


# ------------------------------------------------------------------------------------------ workload


@dataclass(frozen=True)
class Arrival:
    at: float  # seconds after the scenario starts
    prompt: list[int]
    max_new_tokens: int


def make_schedule(args: argparse.Namespace, vocab: int, max_context: int) -> list[Arrival]:
    """Seeded Poisson arrivals and uniform lengths, identical for every scenario (and the base-only run)."""
    rng = random.Random(args.seed)
    t = 0.0
    out: list[Arrival] = []
    for _ in range(args.requests):
        t += rng.expovariate(args.rate)
        if t > args.duration:
            break
        n_in = rng.randint(args.min_len, args.max_len)
        n_out = rng.randint(args.min_len, args.max_len)
        n_out = max(1, min(n_out, max_context - n_in))
        out.append(Arrival(t, [rng.randrange(3, vocab) for _ in range(n_in)], n_out))
    return out


def pick_adapters(kind: str, n: int, count: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    if kind == "distinct":
        return [i % n for i in range(count)]
    if kind == "uniform":
        return [rng.randrange(n) for _ in range(count)]
    if kind == "zipf":
        return rng.choices(range(n), weights=[1.0 / (k + 1) for k in range(n)], k=count)
    if kind == "identical":
        return [0] * count
    raise ValueError(f"unknown popularity {kind!r}")


@dataclass
class Outcome:
    tokens: int = 0
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    end: float = 0.0
    error: str = ""


async def one_request(
    stub: epb_grpc.EngineServiceStub, t0: float, arrival: Arrival, adapter: str, timeout: float
) -> Outcome:
    await asyncio.sleep(max(0.0, t0 + arrival.at - time.perf_counter()))
    request = epb.GenerateStreamRequest(
        adapter=adapter,
        token_ids=epb.TokenIds(ids=arrival.prompt),
        stopping=epb.StoppingCriteria(max_new_tokens=arrival.max_new_tokens, ignore_eos=True),
        response=epb.ResponseOptions(token_ids=True),
    )
    out = Outcome()
    sent = last = time.perf_counter()
    try:
        async for message in stub.GenerateStream(request, timeout=timeout):
            now = time.perf_counter()
            n = len(message.tokens)
            if n == 0:
                continue
            if out.ttft is None:
                out.ttft = now - sent
            else:
                out.gaps += [(now - last) / n] * n  # tokens batched in one message share the gap
            out.tokens += n
            last = now
    except grpc.aio.AioRpcError as exc:
        out.error = exc.code().name
    out.end = time.perf_counter()
    return out


async def run_scenario(
    stub: epb_grpc.EngineServiceStub, schedule: Sequence[Arrival], adapters: Sequence[str], timeout: float
) -> dict[str, Any]:
    t0 = time.perf_counter() + 0.05
    tasks = [
        asyncio.create_task(one_request(stub, t0, a, ref, timeout)) for a, ref in zip(schedule, adapters, strict=True)
    ]
    outcomes = await asyncio.gather(*tasks)
    ok = [o for o in outcomes if not o.error]
    span = max((o.end for o in outcomes), default=t0) - t0
    ttft = [o.ttft * 1000 for o in ok if o.ttft is not None]
    gaps = [g * 1000 for o in ok for g in o.gaps]
    errors: dict[str, int] = {}
    for o in outcomes:
        if o.error:
            errors[o.error] = errors.get(o.error, 0) + 1
    return {
        "requests": len(outcomes),
        "errors": errors,
        "output_tokens": sum(o.tokens for o in ok),
        "tok_s": sum(o.tokens for o in ok) / span if span > 0 else 0.0,
        "ttft_p50_ms": percentile(ttft, 50) if ttft else float("nan"),
        "ttft_p99_ms": percentile(ttft, 99) if ttft else float("nan"),
        "itl_p50_ms": percentile(gaps, 50) if gaps else float("nan"),
        "itl_p99_ms": percentile(gaps, 99) if gaps else float("nan"),
        "span_s": span,
    }


# ------------------------------------------------------------------------------------------ metrics


Histogram = dict[str, dict[str, Any]]  # tier -> {"buckets": {le: cumulative count}, "sum": s, "count": n}


def scrape_load_histogram(url: str | None) -> Histogram:
    if url is None:
        return {}
    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(url, timeout=10).read().decode()
    out: Histogram = {}
    for family in text_string_to_metric_families(body):
        if family.name != LOAD_METRIC:
            continue
        for sample in family.samples:
            tier = sample.labels.get("tier", "")
            entry = out.setdefault(tier, {"buckets": {}, "sum": 0.0, "count": 0.0})
            if sample.name.endswith("_bucket"):
                entry["buckets"][float(sample.labels["le"])] = sample.value
            elif sample.name.endswith("_sum"):
                entry["sum"] = sample.value
            elif sample.name.endswith("_count"):
                entry["count"] = sample.value
    return out


def load_delta(before: Histogram, after: Histogram) -> dict[str, dict[str, float]]:
    """Per tier: loads during the scenario, mean, and p50/p99 as histogram bucket upper bounds."""
    out: dict[str, dict[str, float]] = {}
    for tier, a in after.items():
        b = before.get(tier, {"buckets": {}, "sum": 0.0, "count": 0.0})
        count = a["count"] - b["count"]
        if count <= 0:
            continue
        buckets = {le: v - b["buckets"].get(le, 0.0) for le, v in sorted(a["buckets"].items())}

        def quantile(q: float, buckets: dict[float, float] = buckets, count: float = count) -> float:
            return next((le for le, cum in buckets.items() if cum >= q * count), float("inf"))

        out[tier] = {
            "loads": count,
            "mean_ms": (a["sum"] - b["sum"]) / count * 1000,
            "p50_le_ms": quantile(0.5) * 1000,
            "p99_le_ms": quantile(0.99) * 1000,
        }
    return out


# ------------------------------------------------------------------------------------------ driver


def fmt_loads(loads: dict[str, dict[str, float]]) -> str:
    if not loads:
        return "-"
    return "; ".join(
        f"{tier}: {v['loads']:.0f}x mean {v['mean_ms']:.0f} ms, p50 ≤{v['p50_le_ms']:.0f}, p99 ≤{v['p99_le_ms']:.0f}"
        for tier, v in loads.items()
    )


TABLE_HEADER = (
    "| adapters | popularity | used | tok/s | x base | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | "
    "errors | cold loads (by tier) |\n|---|---|---|---|---|---|---|---|---|---|---|"
)


def table_row(base: dict[str, Any], r: dict[str, Any]) -> str:
    ratio = r["tok_s"] / base["tok_s"] if base["tok_s"] else float("nan")
    return (
        f"| {r['adapters']} | {r['popularity']} | {r.get('distinct_used', 0)} | {r['tok_s']:.1f} | {ratio:.2f} | "
        f"{r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.1f} | {r['itl_p99_ms']:.1f} | "
        f"{sum(r['errors'].values())} | {fmt_loads(r.get('loads', {}))} |"
    )


async def bench(args: argparse.Namespace, stack: Stack, work: Path) -> dict[str, Any]:
    channel = grpc.aio.insecure_channel(stack.engine, options=[("grpc.max_concurrent_streams", 10_000)])
    stub = epb_grpc.EngineServiceStub(channel)
    info = await stub.GetModelInfo(epb.GetModelInfoRequest())
    schedule = make_schedule(args, info.vocab_size, info.max_context_length)
    if not schedule:
        raise SystemExit("no requests fit in --duration at this --rate")
    print(
        f"engine {stack.engine}: {info.base_model} ({info.architecture}, {info.device}, {info.dtype}), "
        f"{len(schedule)} requests per scenario over {schedule[-1].at:.1f} s at {args.rate}/s, "
        f"lengths {args.min_len}..{args.max_len}"
    )
    refs, push_s = await push_adapters(stack.registry, info.base_model, max(args.adapters), args.ranks, work)
    print(f"pushed {len(refs)} synthetic adapters (ranks {args.ranks}, all linear) in {push_s:.1f} s")
    no_adapter = [""] * len(schedule)
    await run_scenario(stub, schedule, no_adapter, args.request_timeout)  # warm-up: lazy init, allocator, threads
    base = await run_scenario(stub, schedule, no_adapter, args.request_timeout)
    base.update(adapters=0, popularity="base model only")
    print("\n" + TABLE_HEADER + "\n" + table_row(base, base), flush=True)
    rows: list[dict[str, Any]] = []
    for n in args.adapters:
        for kind in args.popularity if n > 1 else ("identical",):
            evicted = await evict_all(stub)
            before = scrape_load_histogram(stack.metrics_url)
            picks = pick_adapters(kind, n, len(schedule), args.seed + n)
            row = await run_scenario(stub, schedule, [refs[k] for k in picks], args.request_timeout)
            row.update(adapters=n, popularity=kind, distinct_used=len(set(picks)), evicted_before=evicted)
            row["loads"] = load_delta(before, scrape_load_histogram(stack.metrics_url))
            rows.append(row)
            print(table_row(base, row), flush=True)
    again = await run_scenario(stub, schedule, no_adapter, args.request_timeout)
    again.update(adapters=0, popularity="base model only, again (drift check)")
    print(table_row(base, again), flush=True)
    await channel.close(None)
    print(
        "\nx base = output tokens/s over the first base-model-only run (same arrivals and lengths, after one "
        "discarded warm-up run); the last row repeats it to show drift. used = distinct adapters requested."
    )
    return {
        "base": base,
        "base_again": again,
        "scenarios": rows,
        "requests_per_scenario": len(schedule),
        "args": vars(args),
    }


def parse_positive(text: str, what: str, kind: Callable[[str], N] = int) -> list[N]:
    """A comma-separated list of positive ``kind`` values (a flag's value); exits with a message naming ``what``."""
    noun = "integers" if kind is int else "numbers"
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"{what} must be comma-separated {noun}, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise SystemExit(f"{what} must be positive {noun}")
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--engine", default=None, help="running engine HOST:PORT (default: start one here)")
    parser.add_argument("--registry", default=None, help="that engine's registry HOST:PORT (with --engine)")
    parser.add_argument("--metrics-url", default=None, help="that engine's Prometheus URL (with --engine)")
    parser.add_argument("--adapters", default="1,8,64,512", help="adapter counts N, comma-separated")
    parser.add_argument("--popularity", default=",".join(POPULARITY), help="subset of " + ",".join(POPULARITY))
    parser.add_argument("--requests", type=int, default=64, help="requests per scenario (upper bound)")
    parser.add_argument("--duration", type=float, default=60.0, help="arrival window per scenario, seconds")
    parser.add_argument("--rate", type=float, default=4.0, help="Poisson arrival rate, requests/s")
    parser.add_argument("--min-len", type=int, default=8, help="shortest input/output length (tokens)")
    parser.add_argument("--max-len", type=int, default=512, help="longest input/output length (tokens)")
    parser.add_argument("--ranks", default="8,16,32", help="adapter ranks, cycled over the adapters")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--request-timeout", type=float, default=600.0, help="per-request deadline, seconds")
    parser.add_argument("--hidden", type=int, default=256, help="self-started model: hidden size")
    parser.add_argument("--layers", type=int, default=4, help="self-started model: layers")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="self-started engine: batch size")
    parser.add_argument("--max-adapters-per-batch", type=int, default=256, help="self-started engine: pool slots")
    parser.add_argument(
        "--gpu-adapter-bytes", type=int, default=None, help="self-started engine: device adapter pool budget (bytes)"
    )
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    args.adapters = parse_positive(args.adapters, "--adapters")
    args.ranks = parse_positive(args.ranks, "--ranks")
    args.popularity = [p.strip() for p in args.popularity.split(",") if p.strip()]
    unknown = set(args.popularity) - set(POPULARITY)
    if unknown or not args.popularity:
        parser.error(f"--popularity must be a subset of {','.join(POPULARITY)}")
    if not 1 <= args.min_len <= args.max_len:
        parser.error("need 1 <= --min-len <= --max-len")
    if args.requests < 1 or args.rate <= 0 or args.duration <= 0:
        parser.error("--requests, --rate and --duration must be positive")
    if args.engine and not args.registry:
        parser.error("--engine needs --registry (where its adapters are pushed)")
    for address in (args.engine, args.registry):
        if address and address.split(":")[0] not in ("127.0.0.1", "localhost", "[::1]"):
            parser.error(f"{address}: loopback addresses only")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="loraplex-bench-serve-") as tmp:
        work = Path(tmp)
        if args.engine:
            stack = Stack(args.engine, args.registry, args.metrics_url)
        else:
            print("starting registry + engine subprocesses (CPU, small random Llama)...")
            stack = start_stack(args, work)
        try:
            report = asyncio.run(bench(args, stack, work))
        finally:
            stack.stop()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
