"""Registry I/O: adapter upload/download MB/s through the registry vs raw boto3 on the same S3 endpoint, and
ResolveAdapter latency over gRPC with 10,000 adapters registered (SQLite).

Questions answered: how much does the registry's path (gRPC stream → spool + sha256 + header validation → S3,
and S3 → gRPC stream) cost against talking to S3 directly? (goal: ≥ 0.8 of raw boto3 MB/s) And how fast is the
serving path's one lookup, ``ResolveAdapter``, at catalogue scale? (goal: p99 < 20 ms on SQLite.) Every ratio is
against a baseline measured in this run, on this endpoint.

The adapters are real PEFT-format LoRA files (``base_model.model.model.layers.N.<group>.<module>.lora_{A,B}.weight``
keys, fp16, ``adapter_config.json`` with peft_type LORA) for a registered base model with Llama-3-8B shapes,
all seven linear modules, the rank chosen to hit the requested size. They are written tensor by tensor with a
streaming safetensors writer (random finite fp16 values), so a 1 GB adapter never sits in memory; downloads are
hashed chunk by chunk and dropped, never joined.

    .venv/bin/python bench/registry_io.py                       # 100 MB + 1 GB, 10k adapters, in-process moto
    .venv/bin/python bench/registry_io.py --quick               # 20 MB + 1k adapters (about a minute)
    .venv/bin/python bench/registry_io.py --s3-endpoint http://127.0.0.1:9000 --bucket bench   # MinIO
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import multiprocessing
import os
import random
import re
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from loraplex.registry.blobs import create_bucket_if_missing
from loraplex.registry.client import CHANNEL_OPTIONS, CHUNK_BYTES, RegistryClient
from loraplex.registry.peft_format import lora_key
from loraplex.registry.spec import ModelSpec
from loraplex.registry.store import NewVersion, SqlMetadataStore
from loraplex.registry.v1 import registry_service_pb2 as pb
from loraplex.registry.v1 import registry_service_pb2_grpc as pb_grpc
from loraplex.services.registry_app import start_registry
from loraplex.services.server import ServerHandle
from loraplex.services.settings import RegistrySettings

MB = 1_000_000
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Llama-3-8B's LoRA-relevant shapes: a 1 GB all-linear adapter for it is rank ~190, a realistic large upload.
LLAMA3_8B_SHAPES: dict[str, Any] = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
}
# For the 10k-adapter catalogue: the content does not matter to ResolveAdapter, only the row count does.
TINY_SHAPES: dict[str, Any] = dict(
    LLAMA3_8B_SHAPES, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=320,
)  # fmt: skip
# fp16 bit mask: keep sign + mantissa, cap the exponent field at 0b01011 → finite values with |x| < 0.125.
FP16_SMALL_FINITE_MASK = np.uint16(0xAFFF)
AWS_DUMMY_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


# ------------------------------------------------------------------------------------------ synthetic adapters


def adapter_tensors(spec: ModelSpec, rank: int, targets: Sequence[str]) -> list[tuple[str, tuple[int, int]]]:
    """(PEFT key, shape) for every LoRA tensor of an adapter: A is [r, in], B is [out, r]."""
    shapes = spec.module_shapes()
    out: list[tuple[str, tuple[int, int]]] = []
    for layer in range(spec.num_hidden_layers):
        for module in targets:
            h_in, h_out = shapes[module]
            out.append((lora_key(module, layer, "A"), (rank, h_in)))
            out.append((lora_key(module, layer, "B"), (h_out, rank)))
    return out


def weight_bytes(spec: ModelSpec, rank: int, targets: Sequence[str]) -> int:
    """fp16 payload bytes of an adapter (the safetensors header adds a few KB)."""
    return sum(2 * a * b for _, (a, b) in adapter_tensors(spec, rank, targets))


def rank_for_size(spec: ModelSpec, target_bytes: int, targets: Sequence[str], max_rank: int = 256) -> int:
    """The rank whose adapter is closest to ``target_bytes`` (payload grows linearly with the rank)."""
    rank = max(1, round(target_bytes / weight_bytes(spec, 1, targets)))
    if rank > max_rank:
        raise SystemExit(f"{target_bytes / MB:.0f} MB needs rank {rank} > {max_rank} for these shapes")
    return rank


def write_safetensors(path: Path, tensors: Sequence[tuple[str, tuple[int, int]]], seed: int) -> None:
    """Write fp16 tensors in the safetensors layout one at a time, so memory stays at one tensor.

    Layout: u64 little-endian header length, JSON header (offsets relative to the data section, padded with
    spaces to 8 bytes), then the tensors back to back in header order.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (rows, cols) in tensors:
        size = 2 * rows * cols
        header[name] = {"dtype": "F16", "shape": [rows, cols], "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(seed)
    with path.open("wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for _, shape in tensors:
            bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16) & FP16_SMALL_FINITE_MASK
            out.write(bits.tobytes())


def adapter_config_json(rank: int, targets: Sequence[str], base: str, alpha: float | None = None) -> str:
    """A minimal PEFT ``adapter_config.json`` (the fields PEFT writes that the registry reads)."""
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": rank,
        "lora_alpha": float(alpha if alpha is not None else 2 * rank),
        "lora_dropout": 0.0,
        "target_modules": list(targets),
        "bias": "none",
        "use_rslora": False,
    }
    return json.dumps(config, indent=2, sort_keys=True)


def write_peft_adapter(out_dir: Path, spec: ModelSpec, rank: int, targets: Sequence[str], seed: int, base: str) -> Path:
    """A PEFT-layout adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) without PEFT."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_safetensors(out_dir / "adapter_model.safetensors", adapter_tensors(spec, rank, targets), seed)
    (out_dir / "adapter_config.json").write_text(adapter_config_json(rank, targets, base))
    return out_dir


def perturb(path: Path, round_no: int) -> None:
    """Change one fp16 value in place so each repeat uploads new content (blobs are content-addressed)."""
    with path.open("r+b") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + header_len)
        f.write(struct.pack("<H", 0x2000 + round_no))


# ------------------------------------------------------------------------------------------ S3 endpoint


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _moto_main(port: int, ready: Any, stop: Any) -> None:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log line per S3 request

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    ready.set()
    stop.wait()
    server.stop()


@dataclass
class MotoProcess:
    """moto's ThreadedMotoServer in a child process: it must not share the GIL with the code being measured."""

    endpoint: str
    stop: Callable[[], None]


def start_moto() -> MotoProcess:
    ctx = multiprocessing.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    port = free_port()
    proc = ctx.Process(target=_moto_main, args=(port, ready, stop), daemon=True)
    proc.start()
    if not ready.wait(60):
        proc.kill()
        raise SystemExit("moto server did not start within 60 s")

    def shutdown() -> None:
        stop.set()
        proc.join(10)
        if proc.is_alive():
            proc.kill()

    return MotoProcess(f"http://127.0.0.1:{port}", shutdown)


def s3_client(endpoint: str) -> Any:
    """The same botocore settings as the registry's S3BlobStore, so the baseline differs only in the path."""
    import boto3
    from botocore.config import Config

    config = Config(
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        max_pool_connections=32,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


# ------------------------------------------------------------------------------------------ measurements


@dataclass
class Transfer:
    """Wall and CPU seconds per repeat for one (size, path, direction).

    CPU is this process (the benchmark client, plus the registry when it runs in-process) plus the registry
    subprocess when there is one; the S3 endpoint is left out (the same for both paths). On a shared box the
    wall-clock ratio moves with whatever else runs; CPU seconds per GB show what the registry path costs.
    """

    size_bytes: int
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)

    @property
    def mb_s(self) -> float:
        return self.size_bytes / MB / statistics.median(self.seconds)

    @property
    def cpu_s_per_gb(self) -> float:
        return statistics.median(self.cpu_seconds) / (self.size_bytes / 1e9)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of another process (Linux ``/proc``; 0 where that is not available)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measured(transfer: Transfer, registry_pid: int | None, work: Any) -> Any:
    """Await ``work`` and record its wall and CPU seconds in ``transfer``; returns what ``work`` returned."""
    other = process_cpu_seconds(registry_pid) if registry_pid else 0.0
    cpu, start = time.process_time(), time.perf_counter()
    result = await work
    transfer.seconds.append(time.perf_counter() - start)
    other = (process_cpu_seconds(registry_pid) - other) if registry_pid else 0.0
    transfer.cpu_seconds.append(time.process_time() - cpu + other)
    return result


def raw_put(client: Any, bucket: str, key: str, path: Path) -> None:
    from boto3.s3.transfer import TransferConfig

    client.upload_file(str(path), bucket, key, Config=TransferConfig(multipart_threshold=8 << 20))


def raw_get(client: Any, bucket: str, key: str, expect_sha256: str) -> None:
    """Streamed GET, hashed chunk by chunk (the registry client verifies sha256 too)."""
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    digest = hashlib.sha256()
    while chunk := body.read(CHUNK_BYTES):
        digest.update(chunk)
    if digest.hexdigest() != expect_sha256:
        raise SystemExit(f"raw GET of {key} returned different bytes")


async def registry_get(stub: pb_grpc.AdapterRegistryServiceStub, ref: str, expect_sha256: str) -> None:
    """DownloadAdapterVersion streamed and hashed chunk by chunk, dropped like the raw GET's chunks."""
    digest = hashlib.sha256()
    async for message in stub.DownloadAdapterVersion(pb.DownloadAdapterVersionRequest(ref=ref), timeout=3600):
        digest.update(message.chunk)
    if digest.hexdigest() != expect_sha256:
        raise SystemExit(f"registry download of {ref} returned different bytes")


async def client_get(client: RegistryClient, ref: str, expect_sha256: str) -> None:
    """``RegistryClient.download``: what the engine's fetcher runs (sha256-checked, the whole adapter in memory)."""
    downloaded = await client.download(ref)
    if downloaded.version.weights_sha256 != expect_sha256:
        raise SystemExit(f"RegistryClient.download of {ref} returned a different version")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Env:
    work: Path
    endpoint: str
    bucket: str
    prefix: str
    address: str
    s3: Any
    registry_pid: int | None = None


async def bench_size(env: Env, size_mb: int, repeats: int) -> dict[str, Transfer]:
    """Upload + download one adapter of ~``size_mb`` MB through both paths, ``repeats`` times, alternating."""
    spec = ModelSpec.from_config(LLAMA3_8B_SHAPES)
    rank = rank_for_size(spec, size_mb * MB, LINEAR)
    folder = env.work / f"adapter-{size_mb}mb"
    started = time.perf_counter()
    write_peft_adapter(folder, spec, rank, LINEAR, seed=size_mb, base="bench-llama3-8b")
    weights = folder / "adapter_model.safetensors"
    size = weights.stat().st_size
    print(f"  {size_mb} MB: rank {rank}, {size / MB:.1f} MB file written in {time.perf_counter() - started:.1f} s")
    config = (folder / "adapter_config.json").read_text()
    name = f"bench/io-{size_mb}mb"
    results = {k: Transfer(size) for k in ("raw_put", "raw_get", "reg_put", "reg_get", "client_get")}
    channel = grpc.aio.insecure_channel(env.address, options=CHANNEL_OPTIONS)
    stub = pb_grpc.AdapterRegistryServiceStub(channel)
    async with RegistryClient(env.address, timeout=600) as client:
        await client.create_adapter(name, "bench-llama3-8b")
        for i in range(repeats):
            if i:
                perturb(weights, i)
            sha = await asyncio.to_thread(sha256_file, weights)
            raw_key = f"raw/{uuid.uuid4().hex}"
            pid = env.registry_pid
            await measured(results["raw_put"], pid, asyncio.to_thread(raw_put, env.s3, env.bucket, raw_key, weights))
            version = await measured(results["reg_put"], pid, client.upload(name, config, weights))
            ref = f"{name}@{version.version}"
            await measured(results["raw_get"], pid, asyncio.to_thread(raw_get, env.s3, env.bucket, raw_key, sha))
            await measured(results["reg_get"], pid, registry_get(stub, ref, sha))
            await measured(results["client_get"], pid, client_get(client, ref, sha))
            # Bound the endpoint's memory (moto keeps objects in RAM): drop both copies of this round.
            await asyncio.to_thread(env.s3.delete_object, Bucket=env.bucket, Key=raw_key)
            blob = f"{env.prefix}/sha256/{version.weights_sha256}"
            await asyncio.to_thread(env.s3.delete_object, Bucket=env.bucket, Key=blob)
            await client.delete_version(name, version.version)
            print(
                f"    round {i + 1}: put raw {results['raw_put'].seconds[-1]:.2f} s / registry "
                f"{results['reg_put'].seconds[-1]:.2f} s, get raw {results['raw_get'].seconds[-1]:.2f} s / registry "
                f"{results['reg_get'].seconds[-1]:.2f} s / client.download {results['client_get'].seconds[-1]:.2f} s"
            )
    await channel.close(None)
    shutil.rmtree(folder)
    return results


def populate_catalogue(db_url: str, template: NewVersion, count: int, base: str) -> float:
    """Create ``count`` adapters with one READY version each, straight through the metadata store.

    Why not through gRPC: 10k uploads would measure upload latency, not the lookup; the store's public
    methods are the same transactions the service runs after validation. Returns seconds taken.
    """
    store = SqlMetadataStore(db_url)
    started = time.perf_counter()
    try:
        for i in range(1, count):
            name = catalogue_name(i)
            store.create_adapter(name, "cat", base, "", {})
            store.add_version(name, template)
    finally:
        store.close()
    return time.perf_counter() - started


def catalogue_name(i: int) -> str:
    return f"cat/adapter-{i:05d}"


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def bench_resolve(env: Env, db_url: str, count: int, lookups: int) -> dict[str, float]:
    """Register ``count`` adapters, then time sequential ResolveAdapter calls over gRPC on random refs."""
    spec = ModelSpec.from_config(TINY_SHAPES)
    folder = write_peft_adapter(env.work / "tiny", spec, 4, ("q_proj", "v_proj"), seed=1, base="bench-tiny")
    config = (folder / "adapter_config.json").read_text()
    async with RegistryClient(env.address) as client:
        await client.register_base_model("bench-tiny", json.dumps(TINY_SHAPES))
        await client.create_adapter(catalogue_name(0), "bench-tiny")
        first = await client.upload(catalogue_name(0), config, folder / "adapter_model.safetensors")
        template = NewVersion(
            digest=first.digest,
            weights_sha256=first.weights_sha256,
            blob_key=f"sha256/{first.weights_sha256}",
            size_bytes=first.size_bytes,
            rank=first.rank,
            module_ranks=dict(first.module_ranks),
            lora_alpha=first.lora_alpha,
            use_rslora=first.use_rslora,
            rank_pattern=dict(first.rank_pattern),
            alpha_pattern=dict(first.alpha_pattern),
            target_modules=tuple(first.target_modules),
            dtype=first.dtype,
            adapter_config_json=first.adapter_config_json,
            request_id="",
        )
        insert_s = await asyncio.to_thread(populate_catalogue, db_url, template, count, "bench-tiny")
        print(f"  {count} adapters + versions inserted in {insert_s:.1f} s")
        rng = random.Random(0)
        selectors = ("", "@1", f"@{first.digest}", "@latest")
        refs = [catalogue_name(rng.randrange(count)) + rng.choice(selectors) for _ in range(lookups)]
        for ref in refs[: min(200, lookups)]:  # warm-up: channel, connection pool, SQLite page cache
            await client.resolve(ref)
        latencies: list[float] = []
        started = time.perf_counter()
        for ref in refs:
            t0 = time.perf_counter()
            resolved = await client.resolve(ref)
            latencies.append(time.perf_counter() - t0)
            if resolved.digest != first.digest:
                raise SystemExit(f"{ref} resolved to an unexpected digest")
        total = time.perf_counter() - started
    ms = [s * 1000 for s in latencies]
    return {
        "adapters": count,
        "lookups": lookups,
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms),
        "per_s": lookups / total,
        "insert_s": insert_s,
    }


# ------------------------------------------------------------------------------------------ driver


def print_io(results: dict[int, dict[str, Transfer]]) -> None:
    """MB/s (median wall) and CPU s/GB (median; endpoint excluded) per path, and the registry/raw ratios."""
    print("\n| size | path | upload MB/s | upload CPU s/GB | download MB/s | download CPU s/GB |")
    print("|---|---|---|---|---|---|")
    for size_mb, r in results.items():
        put, get, cget = r["reg_put"], r["reg_get"], r["client_get"]
        rows = (("raw boto3", r["raw_put"], r["raw_get"]), ("registry (gRPC stream)", put, get))
        for label, up_t, down_t in rows:
            print(
                f"| {size_mb} MB | {label} | {up_t.mb_s:.1f} | {up_t.cpu_s_per_gb:.2f} | {down_t.mb_s:.1f} | "
                f"{down_t.cpu_s_per_gb:.2f} |"
            )
        print(f"| {size_mb} MB | RegistryClient.download (in memory) | | | {cget.mb_s:.1f} | {cget.cpu_s_per_gb:.2f} |")
        up = put.mb_s / r["raw_put"].mb_s
        down, cdown = get.mb_s / r["raw_get"].mb_s, cget.mb_s / r["raw_get"].mb_s
        print(
            f"| {size_mb} MB | **ratio** registry/raw (goal ≥ 0.8) | **{up:.2f}** | | **{down:.2f}** "
            f"(RegistryClient.download {cdown:.2f}) | |"
        )


async def run(args: argparse.Namespace, env_endpoint: str, work: Path) -> dict[str, Any]:
    bucket = args.bucket or f"bench-{uuid.uuid4().hex[:12]}"
    s3 = s3_client(env_endpoint)
    create_bucket_if_missing(s3, bucket)
    prefix = "adapters"
    db_url = f"sqlite:///{work / 'registry.db'}"
    settings = RegistrySettings(
        listen="127.0.0.1:0",
        db=db_url,
        blobs=f"s3://{bucket}/{prefix}",
        s3_endpoint=env_endpoint,
        spool_dir=str(work / "spool"),
    )
    handle: ServerHandle | None = None
    proc: subprocess.Popen[str] | None = None
    if args.registry_process:
        proc, port = start_registry_process(settings)
    else:
        handle = await start_registry(settings)
        port = handle.port
    env = Env(work, env_endpoint, bucket, prefix, f"127.0.0.1:{port}", s3, proc.pid if proc else None)
    report: dict[str, Any] = {"endpoint": env_endpoint, "moto": not args.s3_endpoint}
    try:
        async with RegistryClient(env.address) as client:
            await client.register_base_model("bench-llama3-8b", json.dumps(LLAMA3_8B_SHAPES))
        io: dict[int, dict[str, Transfer]] = {}
        for size_mb in args.sizes:
            print(f"\nupload/download, {size_mb} MB adapter, {args.repeats} round(s):")
            io[size_mb] = await bench_size(env, size_mb, args.repeats)
        print_io(io)
        report["io"] = {
            str(k): {
                p: {"mb_s": t.mb_s, "seconds": t.seconds, "cpu_seconds": t.cpu_seconds, "bytes": t.size_bytes}
                for p, t in v.items()
            }
            for k, v in io.items()
        }
        if args.adapters > 0:
            print(f"\nResolveAdapter over gRPC, {args.adapters} adapters (SQLite):")
            r = await bench_resolve(env, db_url, args.adapters, args.lookups)
            print("\n| adapters | lookups | p50 ms | p90 ms | p99 ms (goal < 20) | max ms | lookups/s |")
            print("|---|---|---|---|---|---|---|")
            print(
                f"| {r['adapters']} | {r['lookups']} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | "
                f"**{r['p99_ms']:.2f}** | {r['max_ms']:.2f} | {r['per_s']:.0f} |"
            )
            report["resolve"] = r
    finally:
        if handle is not None:
            await handle.stop(grace=1.0)
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    return report


def start_registry_process(settings: RegistrySettings) -> tuple[subprocess.Popen[str], int]:
    """``loraplex registry serve`` as a child process (own GIL); returns it and the port it reported."""
    exe = str(Path(sys.executable).parent / "loraplex")
    args = [exe, "registry", "serve", "--listen", settings.listen, "--db", settings.db, "--blobs", settings.blobs]
    args += ["--s3-endpoint", str(settings.s3_endpoint), "--spool-dir", str(settings.spool_dir)]
    proc = subprocess.Popen([*args, "--log-level", "warning"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if match := re.search(r"listening on port (\d+)", line):
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # never let the pipe fill up
            return proc, int(match.group(1))
    raise SystemExit(f"registry process exited with {proc.wait()} before listening")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", default="100,1000", help="adapter sizes in MB, comma-separated")
    parser.add_argument("--repeats", type=int, default=1, help="rounds per size (median reported)")
    parser.add_argument("--adapters", type=int, default=10_000, help="catalogue size for ResolveAdapter (0: skip)")
    parser.add_argument("--lookups", type=int, default=5000, help="timed ResolveAdapter calls")
    parser.add_argument("--quick", action="store_true", help="20 MB x 3 rounds + 1,000 adapters / 2,000 lookups")
    parser.add_argument("--s3-endpoint", default=None, help="existing S3 endpoint (MinIO); default: local moto")
    parser.add_argument("--bucket", default=None, help="bucket to use (created when missing); default: fresh")
    parser.add_argument(
        "--registry-process", action="store_true", help="run the registry as a subprocess (default: in-process)"
    )
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir, removed afterwards)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.adapters, args.lookups = "20", 3, 1000, 2000
    try:
        args.sizes = [int(s) for s in str(args.sizes).split(",") if s.strip()]
    except ValueError:
        parser.error("--sizes must be comma-separated integers (MB)")
    if any(s <= 0 for s in args.sizes) or args.repeats < 1 or args.adapters < 0 or args.lookups < 1:
        parser.error("sizes, repeats and lookups must be positive; adapters ≥ 0")
    if 0 < args.adapters < 2:
        parser.error("--adapters must be 0 or at least 2")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.s3_endpoint:
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")  # credentials: the caller's usual AWS env
    else:
        os.environ.update(AWS_DUMMY_ENV)  # moto accepts any credentials
    moto: MotoProcess | None = None
    if args.s3_endpoint:
        endpoint = args.s3_endpoint
        print(f"S3 endpoint: {endpoint}")
    else:
        moto = start_moto()
        endpoint = moto.endpoint
        print(
            f"S3 endpoint: moto ThreadedMotoServer at {endpoint} (child process). moto is in-process Python "
            "and slow: the registry/raw ratios matter, the absolute MB/s do not."
        )
    where = "a `loraplex registry serve` subprocess" if args.registry_process else "in-process start_registry"
    print(f"Registry: {where} (SQLite + the S3 bucket); the benchmark client runs in this process.")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="loraplex-bench-io-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        report = asyncio.run(run(args, endpoint, work))
    finally:
        if moto is not None:
            moto.stop()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
