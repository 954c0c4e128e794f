"""HTTP vs gRPC: the same engine process, the same seeded requests, sent through each door in turn.

Question answered (issue 10): what does the OpenAI-compatible HTTP door cost against the gRPC door? Both doors
live in one engine process and feed one scheduler, so the only difference is the request path: FastAPI/uvicorn,
pydantic bodies, JSON server-sent events and the client's HTTP stack on one side; grpc.aio and protobuf on the
other. Goal: HTTP output tokens/s ≥ 0.95 of gRPC's at the same load; the HTTP layer's added median latency.

Workload: one seeded schedule per load — Poisson arrivals at ``--rates``, prompts of random token ids with
lengths uniform in ``--min-len..--max-len``, a fixed ``--output-len`` with ``ignore_eos`` (every request
produces exactly that many tokens), request i on the base model or one of ``--adapters`` synthetic PEFT-format
adapters (round robin over base + adapters). The identical schedule goes once through gRPC ``GenerateStream``
and once through HTTP ``POST /v1/completions`` (``stream: true``, ``stream_options.include_usage``, prompt as
token ids; client: ``httpx.AsyncClient`` reading the SSE lines itself, the same client stack guidellm uses),
alternating gRPC, HTTP, gRPC, HTTP… ``--rounds`` times per load so drift on a shared machine hits both doors.
One discarded warm-up run per door first (every adapter loaded; they stay resident).

Per door and load: output tokens/s over the run's span (first arrival → last token), TTFT (request sent → first
token), end-to-end latency (sent → last byte), time per output token after the first (TPOT, per request), and CPU
seconds per 1,000 output tokens of the engine process, of its event-loop thread, and of this client process
(steadier than wall time on a busy box). Medians over rounds; the HTTP - gRPC differences of the TTFT and
end-to-end medians are the HTTP layer's added latency under load. Before the loads, ``--pairs`` requests go one at
a time, alternating doors (and which door goes first): the median of the paired differences is the door's unloaded
added latency.

With ``--guidellm PATH`` (a ``guidellm`` executable, e.g. /work/benchvenv/bin/guidellm) it then runs guidellm
against the same engine's HTTP door (``bench/guidellm_sweep.py``): poisson at the same ``--rates`` by default,
or guidellm's own ``sweep`` profile.

It starts its own registry and CPU engine as subprocesses (serve.py's pieces), with serve.py's small random
Llama (or ``--model-dir``, e.g. the demo model in .loraplex/demo/base). Loopback only.

    .venv/bin/python bench/http_vs_grpc.py                                   # ~3 min on 2 busy cores
    .venv/bin/python bench/http_vs_grpc.py --guidellm /work/benchvenv/bin/guidellm --json /tmp/hvg.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx

from loraplex.engine.v1 import engine_service_pb2 as epb
from loraplex.engine.v1 import engine_service_pb2_grpc as epb_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import small_llama
from registry_io import percentile
from serve import BASE_MODEL, METRICS_LINE, PORT_LINE, Stack, _register, parse_positive, push_adapters, spawn

DOORS = ("grpc", "http")


# ------------------------------------------------------------------------------------------ stack


@dataclass
class Engine:
    """The stack plus what only this bench needs: the HTTP port, the engine's pid (for CPU seconds), its model."""

    stack: Stack
    http: str  # http://127.0.0.1:PORT
    pid: int | None  # None for an engine started elsewhere
    model_dir: Path | None


def start_engine(args: argparse.Namespace, work: Path) -> Engine:
    """Registry + engine subprocesses (serve.py's pieces), the engine with both doors on free loopback ports."""
    model_dir = Path(args.model_dir) if args.model_dir else build_random_llama(args, work / "model")
    reg = spawn(
        [
            *("registry", "serve", "--listen", "127.0.0.1:0", "--db", f"sqlite:///{work}/registry.db"),
            *("--blobs", f"file://{work}/blobs", "--log-level", "warning"),
        ]
    )
    try:
        registry = f"127.0.0.1:{reg.wait_for(PORT_LINE, 60)}"
        asyncio.run(_register(registry, (model_dir / "config.json").read_text()))
        http_port = free_port()  # `engine serve` prints no port line for the HTTP door (yet), so choose it here
        eng = spawn(
            [
                *("engine", "serve", "--model", str(model_dir), "--base-model", BASE_MODEL, "--registry", registry),
                *("--listen", "127.0.0.1:0", "--http-listen", f"127.0.0.1:{http_port}", "--metrics-port", "0"),
                *("--log-level", "warning", "--dtype", "float32", "--max-num-seqs", str(args.max_num_seqs)),
                *("--max-lora-rank", "16", "--max-adapters-per-batch", str(max(1, args.adapters))),
            ]
        )
        port = eng.wait_for(PORT_LINE, 300)  # stops the engine itself when it does not come up
        metrics = eng.wait_for(METRICS_LINE, 5)
    except BaseException:
        reg.stop()
        raise
    stack = Stack(f"127.0.0.1:{port}", registry, f"http://127.0.0.1:{metrics}/metrics", [eng, reg])
    return Engine(stack, f"http://127.0.0.1:{http_port}", eng.popen.pid, model_dir)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def build_random_llama(args: argparse.Namespace, out: Path) -> Path:
    """serve.py's model: a random Llama with a byte-level BPE tokenizer (any text tokenizes: guidellm needs that)."""
    return small_llama(out, args.hidden, args.layers, max(256, 2 * (args.max_len + args.output_len)))


def cpu_seconds(pid: int | None, thread: int | None = None) -> float:
    """User + system CPU seconds of a process, all threads (``/proc/PID/stat``), or of one of its threads
    (``/proc/PID/task/TID/stat``; the main thread, TID = PID, runs the engine's event loop: both doors' Python
    work, while forward passes run on the step thread); NaN where unreadable."""
    if pid is None:
        return float("nan")
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    try:
        fields = Path(path).read_text().rpartition(")")[2].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


# ------------------------------------------------------------------------------------------ workload


@dataclass(frozen=True)
class Planned:
    at: float  # seconds after the run starts
    model: str  # "" = the base model, else an adapter reference
    prompt: list[int]
    max_tokens: int


@dataclass
class Result:
    sent: float = 0.0
    first: float | None = None  # first token received
    last: float | None = None  # last token received
    end: float = 0.0  # response complete
    tokens: int = 0
    error: str = ""


def make_plan(args: argparse.Namespace, rate: float, refs: Sequence[str], vocab: int) -> list[Planned]:
    """Seeded per load, identical for both doors and every round."""
    rng = random.Random(f"{args.seed}-{rate}")
    models = ["", *refs]
    out: list[Planned] = []
    t = 0.0
    for i in range(args.requests):
        t += rng.expovariate(rate)
        if t > args.duration:
            break
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(args.min_len, args.max_len))]
        out.append(Planned(t, models[i % len(models)], prompt, args.output_len))
    return out


async def grpc_one(stub: epb_grpc.EngineServiceStub, t0: float, p: Planned, timeout: float) -> Result:
    await asyncio.sleep(max(0.0, t0 + p.at - time.perf_counter()))
    request = epb.GenerateStreamRequest(
        adapter=p.model,
        token_ids=epb.TokenIds(ids=p.prompt),
        stopping=epb.StoppingCriteria(max_new_tokens=p.max_tokens, ignore_eos=True),
    )
    r = Result(sent=time.perf_counter())
    try:
        async for message in stub.GenerateStream(request, timeout=timeout):
            if message.usage.completion_tokens > r.tokens:  # usage is cumulative on every message
                now = time.perf_counter()
                r.first = now if r.first is None else r.first
                r.last = now
                r.tokens = message.usage.completion_tokens
    except grpc.aio.AioRpcError as exc:
        r.error = exc.code().name
    r.end = time.perf_counter()
    return r


async def http_one(client: httpx.AsyncClient, base: str, t0: float, p: Planned, timeout: float) -> Result:
    await asyncio.sleep(max(0.0, t0 + p.at - time.perf_counter()))
    body = {
        "model": p.model or base,
        "prompt": p.prompt,
        "max_tokens": p.max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = Result(sent=time.perf_counter())
    try:
        async with client.stream("POST", "/v1/completions", json=body, timeout=timeout) as response:
            if response.status_code != 200:
                r.error = f"HTTP {response.status_code}"
                await response.aread()
            else:
                await read_sse(response, r)
    except httpx.HTTPError as exc:
        r.error = type(exc).__name__
    r.end = time.perf_counter()
    return r


async def read_sse(response: httpx.Response, r: Result) -> None:
    """Every ``data:`` line with a choice is one engine delta carrying ≥ 1 token (the server skips empty ones);
    the count comes from the final usage chunk, as a client of the OpenAI API would get it."""
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            return
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError:
            r.error = "invalid SSE JSON"
            return
        if "error" in chunk:
            r.error = str(chunk["error"].get("code", "stream error"))
            return
        if chunk.get("choices"):
            now = time.perf_counter()
            r.first = now if r.first is None else r.first
            r.last = now
        elif chunk.get("usage"):
            r.tokens = chunk["usage"]["completion_tokens"]


Sender = Callable[[float, Planned], Awaitable[Result]]


async def run_once(send: Sender, plan: Sequence[Planned], engine_pid: int | None) -> dict[str, Any]:
    cpu0, loop0, mine0 = cpu_seconds(engine_pid), cpu_seconds(engine_pid, engine_pid), time.process_time()
    t0 = time.perf_counter() + 0.05
    results = await asyncio.gather(*(send(t0, p) for p in plan))
    cpu1, loop1, mine1 = cpu_seconds(engine_pid), cpu_seconds(engine_pid, engine_pid), time.process_time()
    span = max((r.end for r in results), default=t0) - t0
    stats = latency_stats(results)
    kilo = max(stats["output_tokens"], 1) / 1000
    return {
        **stats,
        "span_s": span,
        "tok_s": stats["output_tokens"] / span if span > 0 else 0.0,
        "engine_cpu_s_per_ktok": (cpu1 - cpu0) / kilo,
        "loop_cpu_s_per_ktok": (loop1 - loop0) / kilo,
        "client_cpu_s_per_ktok": (mine1 - mine0) / kilo,
    }


def latency_stats(results: Sequence[Result]) -> dict[str, Any]:
    ok = [r for r in results if not r.error and r.first is not None and r.last is not None]
    errors: dict[str, int] = {}
    for r in results:
        if r.error or r.first is None:
            errors[r.error or "no tokens"] = errors.get(r.error or "no tokens", 0) + 1
    ttft = [(r.first - r.sent) * 1e3 for r in ok if r.first is not None]
    e2e = [(r.end - r.sent) * 1e3 for r in ok]
    tpot = [(r.last - r.first) * 1e3 / (r.tokens - 1) for r in ok if r.last and r.first and r.tokens > 1]
    return {
        "requests": len(results),
        "errors": errors,
        "output_tokens": sum(r.tokens for r in ok),
        "ttft_p50_ms": _pct(ttft, 50),
        "ttft_p99_ms": _pct(ttft, 99),
        "e2e_p50_ms": _pct(e2e, 50),
        "e2e_p99_ms": _pct(e2e, 99),
        "tpot_p50_ms": _pct(tpot, 50),
    }


async def one_at_a_time(senders: dict[str, Sender], plan: Sequence[Planned], pairs: int) -> dict[str, Any]:
    """Unloaded latency: one request in flight at a time, the doors alternating (which goes first alternates too),
    so each pair sees the same machine state; the median of the per-pair differences is the door's added cost."""
    got: dict[str, list[Result]] = {door: [] for door in DOORS}
    for i in range(pairs):
        p = plan[i % len(plan)]
        for door in DOORS if i % 2 == 0 else DOORS[::-1]:
            got[door].append(await senders[door](time.perf_counter(), Planned(0.0, p.model, p.prompt, p.max_tokens)))
    out: dict[str, Any] = {door: latency_stats(got[door]) for door in DOORS}
    for name, mark in (("ttft", "first"), ("e2e", "end")):
        deltas = [
            (getattr(h, mark) - h.sent) - (getattr(g, mark) - g.sent)
            for g, h in zip(got["grpc"], got["http"], strict=True)
            if not g.error and not h.error and g.first is not None and h.first is not None
        ]
        out[f"paired_{name}_delta_p50_ms"] = _pct([d * 1e3 for d in deltas], 50)
    return out


def _pct(values: Sequence[float], q: float) -> float:
    return percentile(values, q) if values else float("nan")


# ------------------------------------------------------------------------------------------ driver


FIGURES = (
    "tok_s",
    "ttft_p50_ms",
    "ttft_p99_ms",
    "e2e_p50_ms",
    "e2e_p99_ms",
    "tpot_p50_ms",
    "engine_cpu_s_per_ktok",
    "loop_cpu_s_per_ktok",
    "client_cpu_s_per_ktok",
)


def median_of(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in FIGURES}
    out["errors"] = sum(sum(r["errors"].values()) for r in runs)
    out["tok_s_runs"] = [round(r["tok_s"], 1) for r in runs]
    return out


TABLE_HEADER = (
    "| load req/s | door | tok/s (runs) | **HTTP/gRPC tok/s** | TTFT p50 ms | TTFT p99 ms | E2E p50 ms | E2E p99 ms | "
    "TPOT p50 ms | engine CPU s/ktok | of which loop thread | client CPU s/ktok | errors |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def table_rows(rate: float, g: dict[str, Any], h: dict[str, Any]) -> list[str]:
    ratio = h["tok_s"] / g["tok_s"] if g["tok_s"] else float("nan")
    rows = []
    for door, m in (("gRPC", g), ("HTTP", h)):
        runs = ", ".join(f"{v:.0f}" for v in m["tok_s_runs"])
        rows.append(
            f"| {rate:g} | {door} | {m['tok_s']:.0f} ({runs}) | {f'**{ratio:.3f}**' if door == 'HTTP' else ''} | "
            f"{m['ttft_p50_ms']:.1f} | {m['ttft_p99_ms']:.0f} | {m['e2e_p50_ms']:.0f} | {m['e2e_p99_ms']:.0f} | "
            f"{m['tpot_p50_ms']:.1f} | {m['engine_cpu_s_per_ktok']:.2f} | {m['loop_cpu_s_per_ktok']:.2f} | "
            f"{m['client_cpu_s_per_ktok']:.2f} | "
            f"{m['errors']} |"
        )
    d_ttft, d_e2e = h["ttft_p50_ms"] - g["ttft_p50_ms"], h["e2e_p50_ms"] - g["e2e_p50_ms"]
    rows.append(f"| {rate:g} | HTTP - gRPC | | | {d_ttft:+.1f} | | {d_e2e:+.1f} | | | | | | |")
    return rows


async def bench(args: argparse.Namespace, engine: Engine, work: Path) -> dict[str, Any]:
    channel = grpc.aio.insecure_channel(engine.stack.engine, options=[("grpc.max_concurrent_streams", 10_000)])
    stub = epb_grpc.EngineServiceStub(channel)
    info = await stub.GetModelInfo(epb.GetModelInfoRequest())
    if args.max_len + args.output_len > info.max_context_length:
        raise SystemExit(f"--max-len + --output-len exceed the model's context ({info.max_context_length})")
    refs: list[str] = []
    if args.adapters:
        refs, push_s = await push_adapters(engine.stack.registry, info.base_model, args.adapters, [8, 16], work)
        print(f"pushed {len(refs)} synthetic adapters (ranks 8/16, all linear) in {push_s:.1f} s")
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    client = httpx.AsyncClient(base_url=engine.http, limits=limits, timeout=args.request_timeout)
    senders: dict[str, Sender] = {
        "grpc": lambda t0, p: grpc_one(stub, t0, p, args.request_timeout),
        "http": lambda t0, p: http_one(client, info.base_model, t0, p, args.request_timeout),
    }
    print(
        f"engine {engine.stack.engine} + {engine.http}: {info.base_model} ({info.architecture}, {info.device}, "
        f"{info.dtype}); base + {len(refs)} adapters round robin; prompts {args.min_len}..{args.max_len} tokens, "
        f"{args.output_len} output tokens (ignore_eos); {args.rounds} interleaved rounds per door and load"
    )
    warm = make_plan(args, max(args.rates), refs, info.vocab_size)
    for door in DOORS:  # lazy init, adapters loaded, connections opened
        await run_once(senders[door], warm, engine.pid)
    unloaded: dict[str, Any] = {}
    if args.pairs:
        unloaded = await one_at_a_time(senders, warm, args.pairs)
        g, h = unloaded["grpc"], unloaded["http"]
        print(
            f"\none request at a time, {args.pairs} alternating pairs:\n"
            "| door | TTFT p50 ms | E2E p50 ms | TPOT p50 ms | errors |\n|---|---|---|---|---|\n"
            + "\n".join(
                f"| {name} | {m['ttft_p50_ms']:.1f} | {m['e2e_p50_ms']:.1f} | {m['tpot_p50_ms']:.2f} | "
                f"{sum(m['errors'].values())} |"
                for name, m in (("gRPC", g), ("HTTP", h))
            )
            + f"\n| HTTP - gRPC (difference of medians) | {h['ttft_p50_ms'] - g['ttft_p50_ms']:+.1f} | "
            f"{h['e2e_p50_ms'] - g['e2e_p50_ms']:+.1f} | | |\n"
            f"| HTTP - gRPC (median of paired differences) | {unloaded['paired_ttft_delta_p50_ms']:+.1f} | "
            f"{unloaded['paired_e2e_delta_p50_ms']:+.1f} | | |",
            flush=True,
        )
    print("\nunder load (Poisson arrivals, the same schedule through each door):\n" + TABLE_HEADER, flush=True)
    loads: list[dict[str, Any]] = []
    for rate in args.rates:
        plan = make_plan(args, rate, refs, info.vocab_size)
        runs: dict[str, list[dict[str, Any]]] = {door: [] for door in DOORS}
        for _ in range(args.rounds):
            for door in DOORS:
                runs[door].append(await run_once(senders[door], plan, engine.pid))
        g, h = median_of(runs["grpc"]), median_of(runs["http"])
        for row in table_rows(rate, g, h):
            print(row, flush=True)
        loads.append(
            {
                "rate": rate,
                "requests": len(plan),
                "arrival_window_s": plan[-1].at if plan else 0.0,
                "grpc": g,
                "http": h,
                "ratio_tok_s": h["tok_s"] / g["tok_s"] if g["tok_s"] else float("nan"),
                "added_ttft_p50_ms": h["ttft_p50_ms"] - g["ttft_p50_ms"],
                "added_e2e_p50_ms": h["e2e_p50_ms"] - g["e2e_p50_ms"],
                "runs": runs,
            }
        )
    await client.aclose()
    await channel.close(None)
    print(
        "\ntok/s = output tokens over first arrival → last token, median of the rounds (each round listed); "
        "HTTP/gRPC tok/s = ratio of those medians; CPU s/ktok = CPU seconds per 1,000 output tokens of the engine "
        "process (both doors share it; 'of which loop thread' = its main thread, which runs the event loop: both "
        "doors' Python work, while forward passes run on the step thread) and of this client process."
    )
    return {"unloaded": unloaded, "loads": loads, "base_model": info.base_model, "adapters": refs}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rates", default="2,6,20", help="Poisson arrival rates, requests/s (below → above capacity)")
    parser.add_argument("--requests", type=int, default=64, help="requests per run (upper bound)")
    parser.add_argument("--duration", type=float, default=15.0, help="arrival window per run, seconds (upper bound)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved gRPC/HTTP run pairs per load")
    parser.add_argument("--pairs", type=int, default=20, help="one-at-a-time gRPC/HTTP request pairs (0: skip)")
    parser.add_argument("--min-len", type=int, default=8, help="shortest prompt, tokens")
    parser.add_argument("--max-len", type=int, default=64, help="longest prompt, tokens")
    parser.add_argument("--output-len", type=int, default=32, help="output tokens per request (ignore_eos)")
    parser.add_argument("--adapters", type=int, default=4, help="synthetic adapters beside the base model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--model-dir", default=None, help="model folder to serve (default: serve.py's random Llama)")
    parser.add_argument("--hidden", type=int, default=256, help="random Llama: hidden size")
    parser.add_argument("--layers", type=int, default=4, help="random Llama: layers")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="engine: sequences per batch")
    parser.add_argument("--guidellm", default=None, help="guidellm executable: also run guidellm_sweep.py")
    parser.add_argument("--guidellm-profile", default="poisson", choices=("poisson", "sweep"))
    parser.add_argument("--guidellm-seconds", type=float, default=15.0, help="guidellm: seconds per rate")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    args.rates = parse_positive(args.rates, "--rates", float)
    if not 1 <= args.min_len <= args.max_len or args.output_len < 2:
        parser.error("need 1 <= --min-len <= --max-len and --output-len >= 2")
    if args.requests < 1 or args.rounds < 1 or args.adapters < 0 or args.pairs < 0:
        parser.error("--requests and --rounds must be positive, --adapters and --pairs >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    report: dict[str, Any] = {"args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="loraplex-bench-hvg-") as tmp:
        work = Path(tmp)
        print("starting registry + engine subprocesses (CPU)...", flush=True)
        engine = start_engine(args, work)
        started = time.perf_counter()
        try:
            report.update(asyncio.run(bench(args, engine, work)))
            if args.guidellm:
                from guidellm_sweep import run_guidellm

                assert engine.model_dir is not None
                report["guidellm"] = run_guidellm(
                    args.guidellm,
                    engine.http,
                    report["base_model"],
                    engine.model_dir,
                    rates=args.rates if args.guidellm_profile == "poisson" else None,
                    seconds=args.guidellm_seconds,
                    prompt_tokens=(args.min_len, args.max_len),
                    output_tokens=args.output_len,
                    work=work,
                    engine_pid=engine.pid,
                )
        finally:
            report["engine_cpu_s_total"] = cpu_seconds(engine.pid)
            report["wall_s_total"] = time.perf_counter() - started
            engine.stack.stop()
    print(f"\nwall {report['wall_s_total']:.0f} s, engine CPU {report['engine_cpu_s_total']:.0f} s in all")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
