"""Fleet benchmark: 3 engines behind HAProxy (deploy/haproxy/haproxy.cfg) against 1 engine, in one run.

Questions answered: how much throughput do three engines behind the adapter-routing proxy add over one engine
under saturating load, how many CPU cores did each setup use doing it, and does routing by adapter keep cold
loads down compared with plain round-robin? Workload: ``--requests`` closed-loop requests from ``--concurrency``
clients (each sends its next request when the previous one ends: saturating), adapters drawn Zipf(1.0) from
``--adapters`` synthetic PEFT-format adapters, ``--prompt-len`` prompt tokens and ``--new-tokens`` output tokens
each (ignore_eos). Every scenario replays the same seeded sequence of (prompt, adapter), starting with every
engine's caches empty (adapters evicted between scenarios).

Scenarios:
  single        one engine, called directly
  fleet         three engines behind HAProxy with the shipped config (consistent hash on x-loraplex-adapter,
                hash-balance-factor 150)
  round-robin   the same three engines behind HAProxy with `balance roundrobin` instead (no affinity)

Reported per scenario: output tokens/s and its ratio to `single`, p50/p99 request latency, CPU cores used (CPU
seconds of the engines and HAProxy over the wall time, from /proc), registry cold loads
(``loraplex_adapter_cache_events_total{tier="registry",event="download"}`` summed over engines) per distinct
adapter requested, and errors. Each engine runs with ``--threads`` torch threads (OMP_NUM_THREADS), so the single
engine and each fleet member get the same per-engine budget; whether the fleet can scale depends on the cores the
machine has (``os.cpu_count()`` is printed). Loopback only; bounded by ``--requests``.

    .venv/bin/python bench/fleet.py                                  # CPU-sized defaults
    .venv/bin/python bench/fleet.py --requests 384 --concurrency 48 --threads 1 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from loraplex.engine.v1 import engine_service_pb2 as epb
from loraplex.engine.v1 import engine_service_pb2_grpc as epb_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import small_llama
from registry_io import free_port, percentile, process_cpu_seconds
from serve import BASE_MODEL, METRICS_LINE, PORT_LINE, Proc, _register, evict_all, pick_adapters, push_adapters, spawn

ROOT = Path(__file__).resolve().parents[1]
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
DOWNLOADS = 'loraplex_adapter_cache_events_total{event="download",tier="registry"}'


@dataclass
class Engine:
    proc: Proc
    grpc_port: int
    http_port: int
    metrics_port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def downloads(self) -> float:
        body = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        for line in body.splitlines():
            key, _, value = line.rpartition(" ")
            if _same_labels(key, DOWNLOADS):
                return float(value)
        return 0.0


def _same_labels(a: str, b: str) -> bool:
    name_a, _, labels_a = a.partition("{")
    name_b, _, labels_b = b.partition("{")
    return name_a == name_b and sorted(labels_a.rstrip("}").split(",")) == sorted(labels_b.rstrip("}").split(","))


def start_engine(model_dir: Path, registry: str, args: argparse.Namespace) -> Engine:
    http_port = free_port()
    proc = spawn(
        [
            *("engine", "serve", "--model", str(model_dir), "--base-model", BASE_MODEL, "--registry", registry),
            *("--listen", "127.0.0.1:0", "--http-listen", f"127.0.0.1:{http_port}", "--metrics-port", "0"),
            *("--log-level", "warning", "--dtype", "float32", "--max-num-seqs", str(args.max_num_seqs)),
            *("--max-lora-rank", str(args.rank), "--max-adapters-per-batch", str(args.max_adapters_per_batch)),
        ]
    )
    port = proc.wait_for(PORT_LINE, 300)
    return Engine(proc, port, http_port, proc.wait_for(METRICS_LINE, 5))


def http_door(engine: Engine) -> bool:
    """Whether the engine serves GET /health on its HTTP port (the shipped config health-checks it)."""
    for _ in range(10):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{engine.http_port}/health", timeout=2) as reply:
                return bool(reply.status == 200)
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    return False


def proxy_config(work: Path, round_robin: bool, health_over_http: bool) -> Path:
    """The shipped config, or a variant: round-robin balancing, and/or a TCP health check of the gRPC port for
    engines without the HTTP door."""
    text = HAPROXY_CFG.read_text()
    if round_robin:
        text = text.replace("balance hdr(x-loraplex-adapter)", "balance roundrobin")
        text = text.replace("balance hash req.body,json_query('$.model')", "balance roundrobin")
    if not health_over_http:
        text = text.replace("\nbackend engines_grpc\n", "\nbackend engines_grpc\n    option tcp-check\n", 1)
        for i in (1, 2, 3):
            text = text.replace(f' check port "${{LORAPLEX_ENGINE_{i}_HTTP_PORT}}" check-proto h1', " check")
    path = work / ("haproxy-rr.cfg" if round_robin else "haproxy.cfg")
    path.write_text(text)
    return path


def start_proxy(cfg: Path, engines: Sequence[Engine], work: Path) -> tuple[subprocess.Popen[bytes], int, int]:
    haproxy = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")
    if haproxy is None:
        raise SystemExit("haproxy not installed (apt-get install haproxy; tools/setup.sh --test does it)")
    grpc_port, stats_port = free_port(), free_port()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "LORAPLEX_PROXY_GRPC_BIND": f"127.0.0.1:{grpc_port}",
        "LORAPLEX_PROXY_HTTP_BIND": f"127.0.0.1:{free_port()}",
        "LORAPLEX_PROXY_STATS_BIND": f"127.0.0.1:{stats_port}",
    }
    for i, engine in enumerate(engines, start=1):
        env[f"LORAPLEX_ENGINE_{i}_GRPC"] = engine.address
        env[f"LORAPLEX_ENGINE_{i}_HTTP"] = f"127.0.0.1:{engine.http_port}"
        env[f"LORAPLEX_ENGINE_{i}_HTTP_PORT"] = str(engine.http_port)
    log = (work / f"{cfg.stem}.log").open("wb")
    proxy = subprocess.Popen([haproxy, "-db", "-f", str(cfg)], env=env, stdout=log, stderr=log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until every gRPC server is UP
        try:
            rows = urllib.request.urlopen(f"http://127.0.0.1:{stats_port}/stats;csv", timeout=2).read().decode()
            up = [r for r in rows.splitlines() if r.startswith("engines_grpc,engine") and ",UP," in r]
            if len(up) == len(engines):
                return proxy, grpc_port, stats_port
        except OSError:
            pass
        time.sleep(0.5)
    proxy.kill()
    raise SystemExit("HAProxy did not see every engine UP:\n" + (work / f"{cfg.stem}.log").read_text())


# ------------------------------------------------------------------------------------------ workload


async def drive(target: str, work_items: Sequence[tuple[list[int], str]], args: argparse.Namespace) -> dict[str, Any]:
    """Closed loop: ``concurrency`` clients each take the next item when their previous request ended."""
    queue: asyncio.Queue[tuple[list[int], str]] = asyncio.Queue()
    for item in work_items:
        queue.put_nowait(item)
    latencies: list[float] = []
    tokens = 0
    errors: dict[str, int] = {}
    async with grpc.aio.insecure_channel(target) as channel:
        stub = epb_grpc.EngineServiceStub(channel)

        async def client() -> None:
            nonlocal tokens
            while not queue.empty():
                prompt, ref = queue.get_nowait()
                request = epb.GenerateStreamRequest(
                    adapter=ref,
                    token_ids=epb.TokenIds(ids=prompt),
                    stopping=epb.StoppingCriteria(max_new_tokens=args.new_tokens, ignore_eos=True),
                    response=epb.ResponseOptions(token_ids=True),
                )
                sent = time.perf_counter()
                try:
                    async for message in stub.GenerateStream(
                        request, metadata=(("x-loraplex-adapter", ref),), timeout=args.timeout
                    ):
                        tokens += len(message.tokens)
                    latencies.append(time.perf_counter() - sent)
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] = errors.get(exc.code().name, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(args.concurrency)))
        wall = time.perf_counter() - started
    return {
        "wall_s": wall,
        "output_tokens": tokens,
        "tok_s": tokens / wall,
        "latency_p50_s": percentile(latencies, 50) if latencies else float("nan"),
        "latency_p99_s": percentile(latencies, 99) if latencies else float("nan"),
        "errors": errors,
    }


def scenario(
    name: str,
    target: str,
    engines: Sequence[Engine],
    pids: Sequence[int],
    items: Sequence[tuple[list[int], str]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    async def cold() -> None:
        for engine in engines:
            async with grpc.aio.insecure_channel(engine.address) as channel:
                await evict_all(epb_grpc.EngineServiceStub(channel))

    asyncio.run(cold())
    downloads = sum(e.downloads() for e in engines)
    cpu = sum(process_cpu_seconds(pid) for pid in pids)
    result = asyncio.run(drive(target, items, args))
    result["cores_used"] = (sum(process_cpu_seconds(pid) for pid in pids) - cpu) / result["wall_s"]
    result["cold_loads"] = sum(e.downloads() for e in engines) - downloads
    result["cold_loads_per_adapter"] = result["cold_loads"] / len({ref for _, ref in items})
    result["scenario"] = name
    print(
        f"{name:<12} {result['tok_s']:8.1f} tok/s  p50 {result['latency_p50_s']:.2f} s  p99 "
        f"{result['latency_p99_s']:.2f} s  cores {result['cores_used']:.2f}  cold loads "
        f"{result['cold_loads']:.0f} ({result['cold_loads_per_adapter']:.2f}/adapter)  errors {result['errors']}",
        flush=True,
    )
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=192)
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per engine")
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--max-adapters-per-batch", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # torch threads of every engine spawned below
    procs: list[Proc] = []
    proxies: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="loraplex-bench-fleet-") as tmp:
        work = Path(tmp)
        try:
            positions = max(256, 2 * (args.prompt_len + args.new_tokens))
            model_dir = small_llama(work / "model", args.hidden, args.layers, positions)
            reg = spawn(
                [
                    *("registry", "serve", "--listen", "127.0.0.1:0", "--db", f"sqlite:///{work}/registry.db"),
                    *("--blobs", f"file://{work}/blobs", "--log-level", "warning"),
                ]
            )
            procs.append(reg)
            registry = f"127.0.0.1:{reg.wait_for(PORT_LINE, 60)}"
            asyncio.run(_register(registry, (model_dir / "config.json").read_text()))
            refs, _ = asyncio.run(push_adapters(registry, BASE_MODEL, args.adapters, [args.rank], work))
            rng = random.Random(args.seed)
            picks = pick_adapters("zipf", args.adapters, args.requests, args.seed)
            items = [([rng.randrange(3, 300) for _ in range(args.prompt_len)], refs[k]) for k in picks]

            engines = [start_engine(model_dir, registry, args) for _ in range(3)]
            procs += [e.proc for e in engines]
            over_http = all(http_door(e) for e in engines)
            print(
                f"cpu_count {os.cpu_count()}, {args.threads} torch thread(s) per engine, {args.requests} requests, "
                f"{args.concurrency} clients, {args.adapters} adapters Zipf ({len(set(picks))} distinct requested), "
                f"health checks over {'HTTP /health' if over_http else 'TCP (no HTTP door in this build)'}",
                flush=True,
            )
            results = [scenario("single", engines[0].address, engines[:1], [engines[0].proc.popen.pid], items, args)]
            for name, round_robin in (("fleet", False), ("round-robin", True)):
                proxy, port, _ = start_proxy(proxy_config(work, round_robin, over_http), engines, work)
                proxies.append(proxy)
                pids = [proxy.pid, *(e.proc.popen.pid for e in engines)]
                results.append(scenario(name, f"127.0.0.1:{port}", engines, pids, items, args))
                proxy.terminate()
                proxy.wait(30)
            base = results[0]["tok_s"]
            for r in results:
                r["tok_s_vs_single"] = r["tok_s"] / base if base else float("nan")
            print("\n| setup | tok/s | x single | p50 s | p99 s | cores used | cold loads | per adapter | errors |")
            print("|---|---|---|---|---|---|---|---|---|")
            for r in results:
                print(
                    f"| {r['scenario']} | {r['tok_s']:.1f} | {r['tok_s_vs_single']:.2f} | {r['latency_p50_s']:.2f} | "
                    f"{r['latency_p99_s']:.2f} | {r['cores_used']:.2f} | {r['cold_loads']:.0f} | "
                    f"{r['cold_loads_per_adapter']:.2f} | {sum(r['errors'].values())} |"
                )
            if args.json:
                args.json.write_text(
                    json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results}, indent=2)
                )
        finally:
            for proxy in proxies:
                if proxy.poll() is None:
                    proxy.kill()
            for proc in reversed(procs):
                proc.stop()


if __name__ == "__main__":
    main()
