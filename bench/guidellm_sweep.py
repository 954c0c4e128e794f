"""guidellm (PyPI) against the engine's OpenAI HTTP door: a short rate sweep, summarized for RESULTS.md.

Why a third-party load generator at all: bench/http_vs_grpc.py compares the doors with our own client; guidellm
is what peers publish their serving figures with, so running it shows the HTTP door works with a standard tool
unmodified and gives figures in its own terms (requests/s, output tokens/s, TTFT and inter-token latency).

guidellm lives in its own virtual environment (``/work/benchvenv``; it pins versions the engine does not), so it
runs as a subprocess: ``/v1/completions`` with streaming (guidellm's default request shape: ``max_tokens`` =
the synthetic output length, ``ignore_eos``, ``stream_options.include_usage``), synthetic text prompts counted
with the served model's own tokenizer (loaded from the model folder, offline). Profiles: ``poisson`` at the given
rates (the same loads as http_vs_grpc.py's gRPC/HTTP runs) or guidellm's ``sweep`` (synchronous, throughput,
then rates in between). Each rate stops after a fixed number of completed requests (``max_requests``: no request
is cut off mid-stream), with a ``max_duration`` cap. ``GUIDELLM__MAX_WORKER_PROCESSES`` (default here 1) keeps
guidellm's own worker processes from taking the cores the engine needs on a small machine; its CPU seconds are
reported.

    # against a running engine
    .venv/bin/python bench/guidellm_sweep.py --guidellm /work/benchvenv/bin/guidellm \
        --target http://127.0.0.1:8000 --model bench-serve --tokenizer /path/to/model --rates 2,6,20
    # or from http_vs_grpc.py (its own engine, after the door comparison)
    .venv/bin/python bench/http_vs_grpc.py --guidellm /work/benchvenv/bin/guidellm
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

WORKERS = "1"


def run_guidellm(
    exe: str,
    target: str,
    model: str,
    tokenizer: Path,
    *,
    rates: Sequence[float] | None,
    seconds: float,
    prompt_tokens: tuple[int, int],
    output_tokens: int,
    work: Path,
    engine_pid: int | None = None,
    sweep_size: int = 4,
) -> dict[str, Any]:
    """Run guidellm once (one benchmark per rate); return its command line, a per-rate summary and CPU seconds."""
    out = work / "guidellm.json"
    low, high = prompt_tokens
    if rates is None:
        profile: dict[str, Any] = {"kind": "sweep", "sweep_size": sweep_size, "strategy_type": "poisson"}
        count = 48
    else:
        profile = {"kind": "poisson", "rate": list(rates)}
        count = 0  # per rate, below
    data = {
        "kind": "synthetic_text",
        "prompt_tokens": (low + high) // 2,
        "prompt_tokens_min": low,
        "prompt_tokens_max": high,
        "output_tokens": output_tokens,
    }
    constraints = [{"kind": "max_duration", "seconds": 4 * seconds}]
    if rates is not None:  # the same arrival window for every rate: rate x seconds requests (at least 16)
        constraints.append({"kind": "max_requests", "count": [max(16, round(r * seconds)) for r in rates]})
    else:
        constraints.append({"kind": "max_requests", "count": count})
    backend = {"kind": "openai_http", "target": target, "model": model, "request_format": "/v1/completions"}
    command = [
        exe,
        "run",
        *("--backend", json.dumps(backend)),
        *("--tokenizer", json.dumps({"kind": "huggingface_auto", "model": str(tokenizer)})),
        *("--data", json.dumps(data)),
        *("--profile", json.dumps(profile)),
        *[arg for c in constraints for arg in ("--constraint", json.dumps(c))],
        *("--output", json.dumps({"kind": "json", "path": str(out)})),
        "--disable-console-interactive",
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "GUIDELLM__MAX_WORKER_PROCESSES": os.environ.get("GUIDELLM__MAX_WORKER_PROCESSES", WORKERS),
    }
    print("\nguidellm: " + " ".join(_quote(c) for c in command), flush=True)
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu0 = _engine_cpu(engine_pid)
    started = time.perf_counter()
    budget = 120 + (len(rates) if rates else sweep_size) * 8 * seconds
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=budget)
    wall = time.perf_counter() - started
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu1 = _engine_cpu(engine_pid)
    if proc.returncode != 0 or not out.exists():
        raise SystemExit(f"guidellm failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = summarize(json.loads(out.read_text()))
    print(TABLE_HEADER)
    for row in rows:
        print(table_row(row))
    guide_cpu = (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime)
    print(f"guidellm wall {wall:.0f} s, guidellm CPU {guide_cpu:.0f} s, engine CPU {cpu1 - cpu0:.0f} s", flush=True)
    return {
        "command": command,
        "rows": rows,
        "wall_s": wall,
        "guidellm_cpu_s": guide_cpu,
        "engine_cpu_s": cpu1 - cpu0,
        "workers": env["GUIDELLM__MAX_WORKER_PROCESSES"],
    }


def summarize(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per guidellm benchmark: throughput means over the benchmark, latency medians per request."""
    rows = []
    for bench in report["benchmarks"]:
        m = bench["metrics"]
        strategy = bench["config"]["strategy"]
        ok = {k: m[k]["successful"] for k in m if isinstance(m[k], dict) and isinstance(m[k].get("successful"), dict)}
        rows.append(
            {
                "strategy": strategy["type_"],
                "target_rate": strategy.get("rate"),
                "duration_s": bench["duration"],
                "requests": m["request_totals"],
                "req_s": ok["requests_per_second"]["mean"],
                "out_tok_s": ok["output_tokens_per_second"]["mean"],
                "concurrency_mean": ok["request_concurrency"]["mean"],
                "ttft_p50_ms": ok["time_to_first_token_ms"]["median"],
                "itl_p50_ms": ok["inter_token_latency_ms"]["median"],
                "tpot_p50_ms": ok["time_per_output_token_ms"]["median"],
                "latency_p50_s": ok["request_latency"]["median"],
            }
        )
    return rows


TABLE_HEADER = (
    "| guidellm strategy | completed / errored / incomplete | requests/s | output tok/s | mean concurrency | "
    "TTFT p50 ms | ITL p50 ms | TPOT p50 ms | latency p50 s |\n|---|---|---|---|---|---|---|---|---|"
)


def table_row(row: dict[str, Any]) -> str:
    name = row["strategy"] + (f"@{row['target_rate']:g}" if row["target_rate"] is not None else "")
    n = row["requests"]
    return (
        f"| {name} | {n.get('successful', 0)} / {n.get('errored', 0)} / {n.get('incomplete', 0)} | "
        f"{row['req_s']:.2f} | {row['out_tok_s']:.0f} | {row['concurrency_mean']:.1f} | {row['ttft_p50_ms']:.0f} | "
        f"{row['itl_p50_ms']:.1f} | {row['tpot_p50_ms']:.1f} | {row['latency_p50_s']:.2f} |"
    )


def _engine_cpu(pid: int | None) -> float:
    from http_vs_grpc import cpu_seconds

    return cpu_seconds(pid)


def _quote(arg: str) -> str:
    return f"'{arg}'" if any(c in arg for c in ' {}"[]') else arg


def main(argv: Sequence[str] | None = None) -> None:
    import sys
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--guidellm", required=True, help="guidellm executable (its own venv)")
    parser.add_argument("--target", required=True, help="the engine's HTTP base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", required=True, help="the base model's registry name (or an adapter ref)")
    parser.add_argument("--tokenizer", required=True, help="the served model's folder (tokenizer.json)")
    parser.add_argument("--rates", default="2,6,20", help="poisson rates, requests/s; 'sweep' for guidellm's sweep")
    parser.add_argument("--seconds", type=float, default=15.0, help="arrival window per rate")
    parser.add_argument("--min-len", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rates = None if args.rates == "sweep" else [float(r) for r in args.rates.split(",")]
    with tempfile.TemporaryDirectory(prefix="loraplex-bench-guidellm-") as tmp:
        result = run_guidellm(
            args.guidellm,
            args.target,
            args.model,
            Path(args.tokenizer),
            rates=rates,
            seconds=args.seconds,
            prompt_tokens=(args.min_len, args.max_len),
            output_tokens=args.output_len,
            work=Path(tmp),
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
